"""Tree generation: the model decompresses its own knowledge into a dialogue corpus, level by level.

Reads: the model (``model.source``) and the ``tree`` / ``engine`` config. Writes: a corpus directory (see
:mod:`pipeline.corpus`): ``nodes/level_NN/`` per level, ``dialogues/``, ``manifest.json`` (with the quality metrics of
:mod:`pipeline.quality`) and the dataset card ``README.md`` (:mod:`pipeline.card`).

Each level's children are a Ray Dataset whose ``map_batches`` routes rows to a pool of vLLM engine actors. The pool
is started once per run (not per level) and whole subtrees go to the same engine (rows are routed by their level-1
ancestor), so siblings and descendants share prompt prefixes in one engine's cache. A level is written atomically
with a ``_SUCCESS`` marker; rerunning with the same output directory and config skips completed levels.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa

from pipeline import chat, tree
from pipeline.cachekey import stage_key
from pipeline.card import write_card
from pipeline.config import EngineConfig, ModelConfig, TGConfig
from pipeline.hardware import cpu_engine_env
from pipeline.corpus import (
    DIALOGUE_SCHEMA,
    NODE_SCHEMA,
    atomic_write_text,
    read_json,
    read_level,
    write_level,
    write_table,
)
from pipeline.quality import measure_generated

__all__ = ["check_output", "engine_options", "generate"]

_ROLE = {"question": "user", "answer": "assistant", "text": "text"}


def engine_options(model: ModelConfig, engine: EngineConfig, *, model_len: int | None = None) -> dict[str, Any]:
    """Keyword arguments of :func:`actors.engine.start_engines` for a model and engine config."""
    kwargs: dict[str, Any] = {
        "dtype": model.dtype,
        "max_model_len": model_len or model.max_model_len,
        "enable_prefix_caching": engine.enable_prefix_caching,
        "enforce_eager": engine.enforce_eager,
        "max_num_seqs": engine.max_num_seqs,
        "tensor_parallel_size": engine.tensor_parallel_size,
        "trust_remote_code": model.trust_remote_code,
        "disable_log_stats": False,  # keeps vLLM's counters (prefix-cache hits) readable
    }
    env = {}
    if engine.gpus_per_replica > 0:
        kwargs["gpu_memory_utilization"] = engine.gpu_memory_utilization
    else:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(engine.kv_cache_gib)
        env.update(cpu_engine_env(engine.reserved_cpus))
        # vLLM's CPU runner dies ("CPU Generator does not use offset") when a seeded request's prefill is split over
        # two steps: it rewinds the request's generator, which only CUDA generators support. Every tgsft request is
        # seeded, and a level of long prompts overflows one step's token budget, so prompts are never split on CPU.
        kwargs["enable_chunked_prefill"] = False
    kwargs.update(engine.engine_kwargs)
    return {
        "replicas": engine.replicas,
        "num_cpus": engine.cpus_per_replica,
        "num_gpus": engine.gpus_per_replica,
        "engine_kwargs": kwargs,
        "env": env,
    }


def _route(batch: dict, *, engines: list, max_tokens: int, stop: list[str], sampling: dict) -> dict:
    """Ray Data UDF: send each row to the engine that owns its subtree, gather the outputs in row order."""
    import ray

    n = len(batch["node_id"])
    owner = [int(g[:8], 16) % len(engines) for g in batch["group"]]
    calls = []
    for e, engine in enumerate(engines):
        idx = [i for i in range(n) if owner[i] == e]
        if idx:
            ref = engine.generate.remote(
                [batch["prompt"][i] for i in idx],
                [int(batch["seed"][i]) for i in idx],
                max_tokens=max_tokens,
                stop=stop,
                sampling=sampling,
            )
            calls.append((idx, ref))
    cols: dict[str, list] = {k: [None] * n for k in ("text", "n_tokens", "finish_reason", "prompt_tokens")}
    for idx, ref in calls:
        out = ray.get(ref)
        for k, values in out.items():
            for i, v in zip(idx, values):
                cols[k][i] = v
    return {"node_id": list(batch["node_id"]), **cols}


def _run_level(rows: list[dict], *, engines: list, batch_size: int, **gen_kwargs) -> dict[str, dict]:
    """Generate every row of a level through Ray Data; returns node id -> outputs."""
    import ray

    # The prompts move from the rows into the Arrow table (then Ray's object store): the driver keeps no copy of
    # them while the engines work (~150 MB at a 333 k-node level).
    table = pa.table({**{k: [r[k] for r in rows] for k in ("node_id", "group", "seed")},
                      "prompt": [r.pop("prompt") for r in rows]})
    ds = ray.data.from_arrow(table).map_batches(
        _route,
        fn_kwargs={"engines": engines, **gen_kwargs},
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=0.25,  # the UDF only waits on engine actors
    )
    del table
    out: dict[str, dict] = {}
    for part in ray.get(ds.to_arrow_refs()):
        for rec in part.to_pylist():
            out[rec.pop("node_id")] = rec
    return out


def _prompt(kind: str, render: chat.Render, system: list[dict], path: tuple, pt_root: str) -> str:
    if kind == "text":
        return pt_root + "".join(n["text"] for n in path)
    history = tree.path_messages(system, path)
    return chat.question_prompt(render, history) if kind == "question" else chat.answer_prompt(render, history)


def check_output(
    cfg: TGConfig, out_dir: Path, *, overwrite: bool = False, hint: str = "use --overwrite or another --out"
) -> tuple[str, dict | None]:
    """The corpus key of ``cfg`` (:func:`pipeline.cachekey.stage_key` of ``model``, ``engine`` and ``tree``) and the
    manifest in ``out_dir`` to resume from (None: a fresh start).

    Args:
        cfg: the run config.
        out_dir: the corpus directory.
        overwrite: remove an ``out_dir`` that holds something else or another config's corpus.
        hint: how the caller's user gets past such a directory (the default names ``tgsft generate``'s flags).

    Raises:
        ValueError: ``out_dir`` holds something else or another config's corpus, and ``overwrite`` is off.
    """
    digest = stage_key(cfg, "model", "engine", "tree")
    manifest = read_json(out_dir / "manifest.json")
    if manifest is not None and manifest.get("config_hash") == digest:
        return digest, manifest
    if manifest is not None:
        problem = f"holds a corpus made with another config (hash {manifest.get('config_hash')}, this config {digest})"
    elif out_dir.exists() and any(out_dir.iterdir()):
        problem = "is not empty and holds no tgsft manifest"
    else:
        return digest, None
    if not overwrite:
        raise ValueError(f"{out_dir} {problem}; {hint}")
    shutil.rmtree(out_dir)
    return digest, None


def generate(
    cfg: TGConfig,
    *,
    out_dir: Path | None = None,
    overwrite: bool = False,
    engines: list | None = None,
    embedder: Any = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run tree generation (resumable) and return the manifest.

    Args:
        cfg: the run config (``model``, ``engine``, ``tree``, ``ray`` sections are read).
        out_dir: corpus directory (default ``<run_dir>/corpus``).
        overwrite: replace an output directory made with another config.
        engines: running engine actors to use instead of starting a pool (tests share one).
        embedder: a running embedder actor (``.embed.remote(texts) -> np.ndarray``) for question dedup, used
            instead of starting one (benchmarks pass a scripted one); the caller owns it.
        log: where progress lines go.

    Raises:
        ValueError: the output directory holds another config's corpus and ``overwrite`` is off.
    """
    from transformers import AutoTokenizer

    from actors.engine import start_engines, stop_engines
    from pipeline.model import resolve_model
    from pipeline.runtime import init_ray

    t_run = time.monotonic()
    tcfg = cfg.tree
    out_dir = Path(out_dir or cfg.run_dir / "corpus")
    digest, previous = check_output(cfg, out_dir, overwrite=overwrite)
    if previous and previous.get("status") == "complete":
        log(f"generate: reusing the complete corpus in {out_dir} ({previous['dialogues']} dialogues)")
        return previous

    model_path = resolve_model(cfg.model, log=log)
    tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    render = chat.renderer(tok)
    fmt = chat.probe(render, special_tokens=tok.all_special_tokens)
    system = chat.root_messages(tcfg.system_prompt, fmt) if tcfg.mode == "sft" else []
    p0 = tcfg.system_prompt if tcfg.system_prompt is not None else (fmt.default_system or "")
    pt_root = p0 or tok.bos_token or tok.eos_token or ""
    layers = tree.schedule(tcfg.branching, tcfg.max_new_tokens, tcfg.mode)
    manifest: dict[str, Any] = {
        "status": "running",
        "config_hash": digest,
        "model": cfg.model.source,
        "model_path": model_path,
        "tree": tcfg.model_dump(mode="json"),
        "chat_format": {"default_system": fmt.default_system, "user_end": fmt.user_end,
                        "assistant_end": fmt.assistant_end, "markers": list(fmt.markers)},
        "system_prompt": p0 or None,
        "levels": (previous or {}).get("levels", {}),
    }
    atomic_write_text(out_dir / "manifest.json", _dumps(manifest))

    ray = init_ray(address=cfg.ray.address, num_cpus=cfg.ray.num_cpus, dashboard_host=cfg.ray.dashboard_host)
    own_engines = engines is None
    dedup_state = _Dedup(tcfg.dedup, actor=embedder)
    if any(layer.kind == "question" for layer in layers):
        dedup_state.start()
    paths: dict[str, tuple] = {tree.ROOT_ID: ()}
    try:
        for layer in layers:
            done = read_level(out_dir, layer.level)
            if done is not None:
                rows = done[0].to_pylist()
                for r in rows:
                    r["kind"] = layer.kind
                dedup_state.remember(layer, rows)
                log(f"level {layer.level}/{len(layers)} {layer.kind}: reused {done[1]['kept']} kept nodes")
            else:
                if engines is None:
                    t0 = time.monotonic()
                    engines = start_engines(model_path, **engine_options(cfg.model, cfg.engine))
                    manifest["engine_start_seconds"] = round(time.monotonic() - t0, 2)
                    manifest["engine"] = ray.get(engines[0].describe.remote())
                    log(f"engines: {len(engines)} started in {manifest['engine_start_seconds']} s (once per run), "
                        f"dtype {manifest['engine']['dtype']} ({manifest['engine']['dtype_reason']})")
                rows, stats = _generate_level(
                    layer, paths, engines=engines, render=render, system=system, pt_root=pt_root,
                    fmt=fmt, cfg=cfg, dedup=dedup_state,
                )
                write_level(out_dir, layer.level, pa.Table.from_pylist(rows, schema=NODE_SCHEMA),
                            shard_rows=tcfg.shard_rows, stats=stats)
                manifest["levels"][str(layer.level)] = stats
                atomic_write_text(out_dir / "manifest.json", _dumps(manifest))
                log(_level_line(layer, stats, len(layers)))
            paths = tree.grow_paths(paths, rows)
            del rows, done  # only the slim paths go on: a level's full rows must not outlive it (memory at 1 M nodes)
        if engines:
            manifest["engine_metrics"] = _engine_metrics(engines)
    finally:
        dedup_state.close()
        if own_engines and engines:
            stop_engines(engines)

    table = _dialogue_table(paths, system=system, mode=tcfg.mode, tree_hash=digest)
    write_table(table, out_dir / "dialogues", shard_rows=tcfg.shard_rows)
    manifest.update(status="complete", dialogues=table.num_rows, seconds=round(time.monotonic() - t_run, 2))
    manifest["totals"] = _totals(manifest["levels"])
    manifest["quality"] = measure_generated(out_dir, embedder=tcfg.dedup.embedder, actor=embedder,
                                            tasks=cfg.eval.tasks, data_dir=cfg.eval.data_dir, log=log)
    write_card(out_dir, manifest)  # before the manifest says "complete": a complete corpus always has its card
    atomic_write_text(out_dir / "manifest.json", _dumps(manifest))
    log(f"generate: {table.num_rows} dialogues -> {out_dir}")
    return manifest


# ----------------------------------------------------------------------------- one level


def _generate_level(layer: tree.Layer, paths: dict[str, tuple], *, engines, render, system, pt_root, fmt, cfg, dedup):
    tcfg = cfg.tree
    t0 = time.monotonic()
    parents = [
        {"node_id": nid, "group": path[0]["node_id"] if path else None} for nid, path in paths.items()
    ]
    rows = tree.expand(parents, level=layer.level, branching=layer.branching, run_seed=tcfg.seed)
    for r in rows:
        r["prompt"] = _prompt(layer.kind, render, system, paths[r["parent_id"]], pt_root)
    sampling = (tcfg.answer if layer.kind == "answer" else tcfg.question).model_dump()
    outputs = _run_level(
        rows, engines=engines, batch_size=cfg.engine.batch_size, max_tokens=layer.max_new_tokens,
        stop=fmt.stops(layer.kind) if layer.kind != "text" else [], sampling=sampling,
    )
    t_gen = time.monotonic() - t0

    f = tcfg.filters
    for r in rows:
        out = outputs[r["node_id"]]
        text = out["text"] if layer.kind == "text" else out["text"].strip()
        verdict = tree.classify(
            text, out["finish_reason"], kind=layer.kind, markers=fmt.markers, truncated=f.truncated,
            min_chars=f.min_chars, repeat_ngram=f.repeat_ngram, repeat_fraction=f.repeat_fraction,
        )
        r.update(out, text=verdict.text, kind=layer.kind, role=_ROLE[layer.kind],
                 status=verdict.status, drop_reason=verdict.drop_reason)
    for r, dup in zip(rows, tree.mark_duplicates(rows)):
        if dup:
            r.update(status="dropped", drop_reason=tree.DUPLICATE)

    t1 = time.monotonic()
    if layer.kind == "question" and tcfg.dedup.enabled:
        kept = [r for r in rows if r["status"] == "kept"]
        for r, keep in zip(kept, dedup.apply([r["text"] for r in kept])):
            if not keep:
                r.update(status="dropped", drop_reason=tree.NEAR_DUPLICATE)
    t_dedup = time.monotonic() - t1

    dropped: dict[str, int] = {}
    for r in rows:
        if r["status"] != "kept":
            dropped[r["drop_reason"]] = dropped.get(r["drop_reason"], 0) + 1
    gen_tokens = sum(r["n_tokens"] for r in rows)
    stats = {
        "level": layer.level,
        "kind": layer.kind,
        "branching": layer.branching,
        "max_new_tokens": layer.max_new_tokens,
        "parents": len(parents),
        "generated": len(rows),
        "kept": len(rows) - sum(dropped.values()),
        "dropped": dropped,
        "generated_tokens": gen_tokens,
        "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
        "generate_seconds": round(t_gen, 3),
        "dedup_seconds": round(t_dedup, 3),
        "seconds": round(time.monotonic() - t0, 3),
        "tokens_per_s": round(gen_tokens / t_gen, 1) if t_gen > 0 else None,
    }
    return rows, stats


class _Dedup:
    """Question dedup across a run: an embedder actor started at first use, and every kept question's embedding.

    Embeddings never enter the driver: the embedder's output goes by reference to a dedup task, which returns the
    keep mask and the kept rows, and the kept rows stay in Ray's object store. At 1 M nodes the kept questions'
    embeddings alone are ~0.8 GB (500 k x 384 float32), and ``dedup_mask`` concatenates them twice more; in the
    driver that was most of its peak memory (see benchmarks/README.md).
    """

    def __init__(self, dcfg, *, actor=None):
        self._cfg = dcfg
        self._actor = actor
        self._own = actor is None  # an actor passed in belongs to the caller: close() leaves it running
        self._prev: list = []  # ObjectRefs of (k_i, d) float32 arrays: the kept embeddings of earlier levels

    def start(self) -> None:
        """Start the embedder actor without waiting: it loads while the engines start."""
        import ray

        from actors.embedder import Embedder
        from pipeline.model import embedder_path

        if self._actor is None and self._cfg.enabled:
            self._actor = ray.remote(Embedder).options(num_cpus=1, max_restarts=-1, max_task_retries=3).remote(
                embedder_path(self._cfg.embedder), batch_size=self._cfg.batch_size
            )

    def apply(self, texts: list[str]) -> list[bool]:
        """Keep mask for this level's candidate questions; kept ones join the memory."""
        import ray

        if not texts:
            return []
        self.start()
        c = self._cfg
        # num_cpus=0: like the driver before it, the dedup step must not wait for a CPU the engines have reserved.
        task = ray.remote(_dedup_task).options(num_cpus=0, num_returns=2, max_retries=3)
        keep_ref, kept_ref = task.remote(c.model_dump(), self._actor.embed.remote(texts), *self._prev)
        keep = ray.get(keep_ref)
        self._prev.append(kept_ref)
        return keep.tolist()

    def remember(self, layer: tree.Layer, rows: list[dict]) -> None:
        """On resume: re-embed the kept questions of a completed level so later levels dedup against them."""
        if layer.kind == "question" and self._cfg.enabled:
            texts = [r["text"] for r in rows if r["status"] == "kept"]
            if texts:
                self.start()
                self._prev.append(self._actor.embed.remote(texts))

    def close(self) -> None:
        self._prev = []
        if self._actor is not None and self._own:
            import ray

            ray.kill(self._actor, no_restart=True)
            self._actor = None


def _dedup_task(dcfg: dict, emb, *prev):
    """Ray task: (keep mask, kept rows) of one level's question embeddings against earlier levels' kept rows."""
    import numpy as np

    from pipeline.dedup import dedup_mask

    keep = dedup_mask(emb, np.concatenate(prev) if prev else None, threshold=dcfg["threshold"],
                      method=dcfg["method"], block_size=dcfg["block_size"], clusters=dcfg["clusters"])
    return keep, emb[keep]


# ----------------------------------------------------------------------------- outputs


def _dialogue_table(paths: dict[str, tuple], *, system: list[dict], mode: str, tree_hash: str,
                    chunk_rows: int = 50_000) -> pa.Table:
    """One row per root-to-leaf path. Built ``chunk_rows`` dialogues at a time: the per-row Python dicts are far
    larger than their Arrow form, and building all of them at once made this the driver's memory peak at 1 M nodes."""
    chunks, rows = [], []
    for leaf_id, path in paths.items():
        if not path:
            continue
        if len(rows) == chunk_rows:
            chunks.append(pa.Table.from_pylist(rows, schema=DIALOGUE_SCHEMA))
            rows = []
        sft = mode == "sft"
        rows.append({
            "dialogue_id": leaf_id,
            "messages": tree.path_messages(system, path) if sft else [],
            "text": None if sft else "".join(n["text"] for n in path),
            "node_ids": [n["node_id"] for n in path],
            "n_turns": len(path) // 2 if sft else len(path),
            "n_tokens": sum(n["n_tokens"] for n in path),
            "tree": tree_hash,
        })
    chunks.append(pa.Table.from_pylist(rows, schema=DIALOGUE_SCHEMA))
    return pa.concat_tables(chunks)


_METRICS = ("calls", "start_seconds", "vllm:prompt_tokens", "vllm:generation_tokens", "vllm:prefix_cache_queries",
            "vllm:prefix_cache_hits", "vllm:request_success", "vllm:num_preemptions")


def _engine_metrics(engines: list) -> dict:
    """vLLM counters summed over the pool, plus the prefix-cache hit rate of prompt tokens."""
    import ray

    total: dict[str, float] = {}
    for m in ray.get([e.metrics.remote() for e in engines]):
        for k in _METRICS:
            total[k] = total.get(k, 0.0) + m.get(k, 0.0)
    queries, hits = total.get("vllm:prefix_cache_queries"), total.get("vllm:prefix_cache_hits")
    if queries:
        total["prefix_cache_hit_rate"] = round(hits / queries, 4)
    total["replicas"] = len(engines)
    return total


def _totals(levels: dict) -> dict:
    keys = ("generated", "kept", "generated_tokens", "prompt_tokens", "generate_seconds", "dedup_seconds")
    out = {k: round(sum(lv[k] for lv in levels.values()), 3) for k in keys}
    out["tokens_per_s"] = round(out["generated_tokens"] / out["generate_seconds"], 1) if out["generate_seconds"] else None
    return out


def _level_line(layer: tree.Layer, s: dict, depth: int) -> str:
    dedup = s["dropped"].get(tree.NEAR_DUPLICATE, 0)
    rate = dedup / s["generated"] if s["generated"] else 0.0
    drops = ", ".join(f"{k} {v}" for k, v in sorted(s["dropped"].items())) or "none"
    return (
        f"level {layer.level}/{depth} {layer.kind}: {s['parents']} parents -> {s['generated']} nodes, "
        f"kept {s['kept']} (dropped: {drops}; dedup rate {rate:.0%}), {s['generated_tokens']} tokens in "
        f"{s['generate_seconds']:.1f} s ({s['tokens_per_s']} tok/s)"
    )


def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False) + "\n"

"""Tree generation: the model decompresses its own knowledge into a dialogue corpus, level by level.

Reads: the model (``model.source``) and the ``tree`` / ``engine`` config. Writes: a corpus directory (see
:mod:`pipeline.corpus`): ``nodes/level_NN/`` per level, ``dialogues/``, ``manifest.json`` (with the quality metrics of
:mod:`pipeline.quality`) and the dataset card ``README.md`` (:mod:`pipeline.card`).

Each level is a Ray Data pipeline (:mod:`pipeline.levels`) from the frontier of the level above (its kept nodes with
their root-to-node paths, read from Parquet) to the level's rows, written back to Parquet by the workers: no level
passes through the driver, which holds only the manifest, counts and actor handles. The engine pool is started once
per run (not per level) and whole subtrees go to the same engine (rows are routed by their level-1 ancestor), so
siblings and descendants share prompt prefixes in one engine's cache. A level is written atomically with a
``_SUCCESS`` marker; rerunning with the same output directory and config skips completed levels.
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
from pipeline.corpus import (
    DIALOGUE_SCHEMA,
    FRONTIER_SCHEMA,
    NODE_SCHEMA,
    atomic_write_text,
    frontier_dir,
    level_dir,
    read_dataset,
    read_json,
    write_dataset,
)
from pipeline.hardware import cpu_engine_env
from pipeline.levels import LevelSpec, QuestionDedup, grow_level, level_stats, root_frontier
from pipeline.quality import measure_generated

__all__ = ["check_output", "engine_options", "generate"]


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
        "resources": dict(engine.resources),
        "engine_kwargs": kwargs,
        "env": env,
    }


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
    from pipeline.model import resolve_model

    t_run = time.monotonic()
    tcfg = cfg.tree
    out_dir = Path(out_dir or cfg.run_dir / "corpus")
    digest, previous = check_output(cfg, out_dir, overwrite=overwrite)
    if previous and previous.get("status") == "complete":
        log(f"generate: reusing the complete corpus in {out_dir} ({previous['dialogues']} dialogues)")
        return previous

    model_path = resolve_model(cfg.model, log=log)
    tok = _chat_tokenizer(model_path, trust_remote_code=cfg.model.trust_remote_code)
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

    spec = dict(run_seed=tcfg.seed, render=render, fmt=fmt, system=tuple(system), pt_root=pt_root,
                filters=tcfg.filters, batch_size=cfg.engine.batch_size)
    last = _grow(cfg, layers, out_dir=out_dir, manifest=manifest, engines=engines, embedder=embedder, spec=spec,
                 log=log)
    n_dialogues = _write_dialogues(last, out_dir / "dialogues", system=system, mode=tcfg.mode, tree_hash=digest,
                                   shard_rows=tcfg.shard_rows)
    manifest.update(status="complete", dialogues=n_dialogues, seconds=round(time.monotonic() - t_run, 2))
    manifest["totals"] = _totals(manifest["levels"])
    manifest["quality"] = _quality(cfg, out_dir, embedder=embedder, log=log)
    write_card(out_dir, manifest)  # before the manifest says "complete": a complete corpus always has its card
    atomic_write_text(out_dir / "manifest.json", _dumps(manifest))
    log(f"generate: {n_dialogues} dialogues -> {out_dir}")
    return manifest


# ----------------------------------------------------------------------------- the levels


def _chat_tokenizer(model_path: str, *, trust_remote_code: bool) -> Any:
    """The model's tokenizer, for its chat template and special tokens only. A local folder with a
    ``tokenizer.json`` loads as a plain ``PreTrainedTokenizerFast`` (the same template and special tokens; importing
    ``AutoTokenizer`` pulls in torch and scikit-learn, 4 s of a 10 k-node run's start); custom code, hub ids and
    sentencepiece-only tokenizers go through ``AutoTokenizer``."""
    if not trust_remote_code and (Path(model_path) / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(model_path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)


def _start_pool(cfg: TGConfig, model_path: str, manifest: dict, log: Callable[[str], None]) -> list:
    """Start the engine pool (once per run) and record its start time and engine settings in the manifest."""
    import ray

    from actors.engine import start_engines

    t0 = time.monotonic()
    engines = start_engines(model_path, **engine_options(cfg.model, cfg.engine))
    manifest["engine_start_seconds"] = round(time.monotonic() - t0, 2)
    manifest["engine"] = ray.get(engines[0].describe.remote())
    log(f"engines: {len(engines)} started in {manifest['engine_start_seconds']} s (once per run), "
        f"dtype {manifest['engine']['dtype']} ({manifest['engine']['dtype_reason']})")
    return engines


def _grow(
    cfg: TGConfig, layers: list[tree.Layer], *, out_dir: Path, manifest: dict, engines: list | None, embedder: Any,
    spec: dict, log: Callable[[str], None],
) -> Any:
    """Generate every level not yet written (completed ones are reused), recording each in the manifest. The engine
    pool starts at the first level to generate, unless ``engines`` are given, and is stopped at the end.

    Returns:
        The last level's frontier (a Ray Dataset read from its Parquet folder): the dialogues.
    """
    import ray

    from actors.engine import stop_engines
    from pipeline.runtime import init_ray

    init_ray(address=cfg.ray.address, num_cpus=cfg.ray.num_cpus, dashboard_host=cfg.ray.dashboard_host)
    own_engines = engines is None
    dedup_state = QuestionDedup(cfg.tree.dedup, actor=embedder)
    if any(layer.kind == "question" for layer in layers):
        dedup_state.start()
    frontier, parents, regrown = ray.data.from_arrow(root_frontier()), 1, False
    try:
        for layer in layers:
            marker = read_json(level_dir(out_dir, layer.level) / "_SUCCESS")
            if marker is not None and not regrown and (frontier_dir(out_dir, layer.level) / "_SUCCESS").exists():
                if layer.kind == "question":
                    dedup_state.remember(read_dataset(level_dir(out_dir, layer.level), schema=NODE_SCHEMA))
                log(f"level {layer.level}/{len(layers)} {layer.kind}: reused {marker['kept']} kept nodes")
                parents = marker["kept"]
            else:
                regrown = True  # every level below one made now is made again: its parents changed
                if engines is None:
                    engines = _start_pool(cfg, manifest["model_path"], manifest, log)
                stats = _make_level(cfg, layer, frontier, parents=parents, out_dir=out_dir, engines=engines,
                                    dedup=dedup_state, spec=spec)
                manifest["levels"][str(layer.level)] = stats
                atomic_write_text(out_dir / "manifest.json", _dumps(manifest))
                log(_level_line(layer, stats, len(layers)))
                parents = stats["kept"]
            frontier = read_dataset(frontier_dir(out_dir, layer.level), schema=FRONTIER_SCHEMA)
        if engines:
            manifest["engine_metrics"] = _engine_metrics(engines)
    finally:
        dedup_state.close()
        if own_engines and engines:
            stop_engines(engines)
    return frontier


def _make_level(cfg: TGConfig, layer: tree.Layer, frontier: Any, *, parents: int, out_dir: Path, engines: list,
                dedup: QuestionDedup, spec: dict) -> dict:
    """Generate, filter and dedup one level in the workers; write its frontier, then its nodes and ``_SUCCESS``."""
    from ray.data.expressions import col

    tcfg = cfg.tree
    sampling = (tcfg.answer if layer.kind == "answer" else tcfg.question).model_dump()
    t0 = time.monotonic()
    rows = grow_level(frontier, LevelSpec(layer=layer, sampling=sampling, **spec), engines=engines).materialize()
    t_gen = time.monotonic() - t0
    if layer.kind == "question" and tcfg.dedup.enabled:
        rows = dedup.apply(rows).materialize()
    seconds = {"generate": t_gen, "dedup": time.monotonic() - t0 - t_gen}
    kept = rows.filter(expr=col("status") == "kept")
    write_dataset(kept, frontier_dir(out_dir, layer.level), schema=FRONTIER_SCHEMA, shard_rows=tcfg.shard_rows,
                  marker={"level": layer.level})
    seconds["total"] = time.monotonic() - t0
    stats = level_stats(rows, layer, parents=parents, seconds=seconds)
    write_dataset(rows, level_dir(out_dir, layer.level), schema=NODE_SCHEMA, shard_rows=tcfg.shard_rows,
                  marker=stats)
    return stats


# ----------------------------------------------------------------------------- outputs


def _write_dialogues(frontier: Any, directory: Path, *, system: list[dict], mode: str, tree_hash: str,
                     shard_rows: int) -> int:
    """Write one dialogue per root-to-leaf path, made in the workers from the last level's frontier; returns how
    many."""
    table = frontier.map_batches(_dialogues, fn_kwargs={"system": system, "mode": mode, "tree_hash": tree_hash},
                                 batch_format="pyarrow", num_cpus=0.25).materialize()
    write_dataset(table, directory, schema=DIALOGUE_SCHEMA, shard_rows=shard_rows)
    return table.count()


def _dialogues(batch: pa.Table, *, system: list[dict], mode: str, tree_hash: str) -> pa.Table:
    """Ray Data UDF: the dialogue rows (DIALOGUE_SCHEMA) of a batch of last-level frontier rows."""
    sft = mode == "sft"
    rows = []
    for rec in batch.to_pylist():
        path = rec["path"]
        rows.append({
            "dialogue_id": rec["node_id"],
            "messages": tree.path_messages(system, path) if sft else [],
            "text": None if sft else "".join(n["text"] for n in path),
            "node_ids": [n["node_id"] for n in path],
            "n_turns": len(path) // 2 if sft else len(path),
            "n_tokens": sum(n["n_tokens"] for n in path),
            "tree": tree_hash,
        })
    return pa.Table.from_pylist(rows, schema=DIALOGUE_SCHEMA)


def _quality(cfg: TGConfig, out_dir: Path, *, embedder: Any, log: Callable[[str], None]) -> dict:
    """The corpus's quality metrics (:func:`pipeline.quality.measure_generated`), computed in a Ray task: they read
    every node, which must not happen in the driver."""
    import ray

    lines: list[str] = []

    def task() -> tuple[dict, list[str]]:
        q = measure_generated(out_dir, embedder=cfg.tree.dedup.embedder, actor=embedder, tasks=cfg.eval.tasks,
                              data_dir=cfg.eval.data_dir, log=lines.append)
        return q, lines

    q, logged = ray.get(ray.remote(task).options(num_cpus=0).remote())
    for line in logged:
        log(line)
    return q


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
    seconds = out["generate_seconds"]
    out["tokens_per_s"] = round(out["generated_tokens"] / seconds, 1) if seconds else None
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

"""One level of tree generation: prompts, the Ray Data pass over the engine pool, filters, question dedup, and the
level's statistics (:mod:`pipeline.generate` drives the levels and writes them).

Reads the parents' root-to-node paths and sends the children's prompts to running engine actors; writes nothing.
Rows are routed by their level-1 ancestor, so a subtree stays on one engine and shares its prompt-prefix cache.
Question dedup runs in an embedder actor (started at first use) and a Ray task, so embeddings never enter the
driver.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline import chat, tree
from pipeline.config import TGConfig
from pipeline.resources import EMBEDDER_CPUS
from pipeline.sections import DedupConfig

__all__ = ["Prompting", "QuestionDedup", "generate_level"]

_ROLE = {"question": "user", "answer": "assistant", "text": "text"}


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


@dataclass(frozen=True)
class Prompting:
    """What a level's prompts are made of: the model's chat renderer and probed format, the root messages (P0) of an
    sft tree and the root text of a pt tree."""

    render: chat.Render
    fmt: chat.ChatFormat
    system: list[dict]
    pt_root: str

    def prompt(self, kind: str, path: tuple) -> str:
        """The prompt of a ``kind`` node (question, answer or text) whose ancestors are ``path``."""
        if kind == "text":
            return self.pt_root + "".join(n["text"] for n in path)
        history = tree.path_messages(self.system, path)
        if kind == "question":
            return chat.question_prompt(self.render, history)
        return chat.answer_prompt(self.render, history)


def generate_level(layer: tree.Layer, paths: dict[str, tuple], *, engines: list, prompting: Prompting, cfg: TGConfig,
                   dedup: QuestionDedup) -> tuple[list[dict], dict[str, Any]]:
    """Generate, filter and dedup the children of every path of the level above; returns (rows, level statistics)."""
    tcfg = cfg.tree
    t0 = time.monotonic()
    parents = [
        {"node_id": nid, "group": path[0]["node_id"] if path else None} for nid, path in paths.items()
    ]
    rows = tree.expand(parents, level=layer.level, branching=layer.branching, run_seed=tcfg.seed)
    for r in rows:
        r["prompt"] = prompting.prompt(layer.kind, paths[r["parent_id"]])
    sampling = (tcfg.answer if layer.kind == "answer" else tcfg.question).model_dump()
    outputs = _run_level(
        rows, engines=engines, batch_size=cfg.engine.batch_size, max_tokens=layer.max_new_tokens,
        stop=prompting.fmt.stops(layer.kind) if layer.kind != "text" else [], sampling=sampling,
    )
    t_gen = time.monotonic() - t0

    f = tcfg.filters
    for r in rows:
        out = outputs[r["node_id"]]
        text = out["text"] if layer.kind == "text" else out["text"].strip()
        verdict = tree.classify(
            text, out["finish_reason"], kind=layer.kind, markers=prompting.fmt.markers, truncated=f.truncated,
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


class QuestionDedup:
    """Question dedup across a run: an embedder actor started at first use, and every kept question's embedding.

    Embeddings never enter the driver: the embedder's output goes by reference to a dedup task, which returns the
    keep mask and the kept rows, and the kept rows stay in Ray's object store. At 1 M nodes the kept questions'
    embeddings alone are ~0.8 GB (500 k x 384 float32), and ``dedup_mask`` concatenates them twice more; in the
    driver that was most of its peak memory (see benchmarks/README.md).
    """

    def __init__(self, dcfg: DedupConfig, *, actor: Any = None) -> None:
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
            actor = ray.remote(Embedder).options(num_cpus=EMBEDDER_CPUS, max_restarts=-1, max_task_retries=3)
            self._actor = actor.remote(embedder_path(self._cfg.embedder), batch_size=self._cfg.batch_size)

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

"""One level of tree generation as a Ray Data pipeline that never passes through the driver.

A level reads the *frontier* of the level above (its kept nodes, each with its root-to-node path) and produces the
level's node rows::

    frontier -> expand_batch (expand, render prompts, route to the engine pool, filters, sibling duplicates)
             -> QuestionDedup (question levels: embed, bucket, greedy per bucket) -> the level's rows

Everything runs in Ray workers and actors; the driver holds dataset plans, object references and counts (the
level's statistics). Rows are routed by their level-1 ancestor, so a subtree stays on one engine and shares its
prompt-prefix cache. :mod:`pipeline.generate` writes the rows (:mod:`pipeline.corpus`) and drives the levels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import chat, tree
from pipeline.corpus import LEVEL_SCHEMA, PATH_TYPE
from pipeline.dedup import SAMPLE_ROWS
from pipeline.resources import EMBEDDER_CPUS
from pipeline.sections import DedupConfig, FilterConfig

__all__ = ["LevelSpec", "expand_batch", "QuestionDedup", "grow_level", "level_stats", "root_frontier"]

_ROLE = {"question": "user", "answer": "assistant", "text": "text"}
_UDF_CPUS = 0.25  # the level's UDFs mostly wait on engine and embedder actors


@dataclass(frozen=True)
class LevelSpec:
    """What a level's workers need (sent to them once): the layer, the model's chat renderer (picklable, see
    :func:`pipeline.chat.renderer`) and probed format, the root messages (P0) of an sft tree or the root text of a pt
    tree, sampling and filters."""

    layer: tree.Layer
    run_seed: int
    render: chat.Render
    fmt: chat.ChatFormat
    system: tuple[dict, ...]
    pt_root: str
    sampling: dict
    filters: FilterConfig
    batch_size: int  # children per engine call


def root_frontier() -> pa.Table:
    """The frontier above level 1: the root alone, with an empty path."""
    return pa.table({"node_id": [tree.ROOT_ID], "group": pa.array([None], pa.string()),
                     "path": pa.array([[]], PATH_TYPE)})


def _prompt(spec: LevelSpec, path: tuple) -> str:
    """The prompt of a child of the node whose root-to-node path is ``path``."""
    kind = spec.layer.kind
    if kind == "text":
        return spec.pt_root + "".join(n["text"] for n in path)
    history = tree.path_messages(list(spec.system), path)
    return (chat.question_prompt if kind == "question" else chat.answer_prompt)(spec.render, history)


def expand_batch(parents: pa.Table, *, spec: LevelSpec, engines: list) -> Iterator[pa.Table]:
    """Ray Data UDF: the children of a batch of frontier rows, generated and filtered (LEVEL_SCHEMA).

    Every sibling of a parent is made in the same call, so exact sibling duplicates are found here; children go to
    the engines ``spec.batch_size`` at a time, each to the engine that owns its subtree.
    """
    s = spec
    paths = {p["node_id"]: tuple(p["path"] or ()) for p in parents.to_pylist()}
    rows = tree.expand(({"node_id": nid, "group": (p[0]["node_id"] if p else None)} for nid, p in paths.items()),
                       level=s.layer.level, branching=s.layer.branching, run_seed=s.run_seed)
    seen: set = set()  # (parent, normalized text) of kept siblings: duplicates across chunks are found too
    for start in range(0, len(rows), s.batch_size):
        chunk = rows[start : start + s.batch_size]
        prompts = [_prompt(s, paths[r["parent_id"]]) for r in chunk]
        outputs = _route(chunk, prompts, engines=engines, max_tokens=s.layer.max_new_tokens,
                         stop=s.fmt.stops(s.layer.kind) if s.layer.kind != "text" else [], sampling=s.sampling)
        for r, out in zip(chunk, outputs):
            _judge(r, out, s)
        for r, dup in zip(chunk, tree.mark_duplicates(chunk, seen=seen)):
            if dup:
                r.update(status="dropped", drop_reason=tree.DUPLICATE)
        grown = tree.grow_paths(paths, chunk)
        for r in chunk:
            r["path"] = list(grown[r["node_id"]]) if r["node_id"] in grown else None
        yield pa.Table.from_pylist(chunk, schema=LEVEL_SCHEMA)


def _judge(r: dict, out: dict, s: LevelSpec) -> None:
    """Fill one child row from its engine output and the filters' verdict."""
    kind, f = s.layer.kind, s.filters
    text = out["text"] if kind == "text" else out["text"].strip()
    verdict = tree.classify(text, out["finish_reason"], kind=kind, markers=s.fmt.markers, truncated=f.truncated,
                            min_chars=f.min_chars, repeat_ngram=f.repeat_ngram, repeat_fraction=f.repeat_fraction)
    r.update(out, text=verdict.text, kind=kind, role=_ROLE[kind], status=verdict.status,
             drop_reason=verdict.drop_reason)


def _route(rows: list[dict], prompts: list[str], *, engines: list, **gen_kwargs) -> list[dict]:
    """Send each row to the engine that owns its subtree (by level-1 ancestor); outputs in row order."""
    import ray

    owner = [int(r["group"][:8], 16) % len(engines) for r in rows]
    calls = []
    for e, engine in enumerate(engines):
        idx = [i for i in range(len(rows)) if owner[i] == e]
        if idx:
            calls.append((idx, engine.generate.remote([prompts[i] for i in idx],
                                                      [int(rows[i]["seed"]) for i in idx], **gen_kwargs)))
    outputs: list[dict] = [{} for _ in rows]
    for idx, ref in calls:
        out = ray.get(ref)
        for k, values in out.items():
            for i, v in zip(idx, values):
                outputs[i][k] = v
    return outputs


def grow_level(frontier, spec: LevelSpec, *, engines: list):
    """The level's rows (LEVEL_SCHEMA) as a lazy Ray Dataset over ``frontier`` (a Dataset of the kept nodes above)."""
    # Two calls in flight per engine keep it busy; more tasks would only start more worker processes, whose start-up
    # and imports dominate a small level.
    return frontier.map_batches(expand_batch, fn_kwargs={"spec": spec, "engines": engines},
                                batch_size=max(1, spec.batch_size // spec.layer.branching), batch_format="pyarrow",
                                num_cpus=_UDF_CPUS, concurrency=2 * len(engines))


def level_stats(level, layer: tree.Layer, *, parents: int, seconds: dict) -> dict[str, Any]:
    """A level's statistics from its (materialized) rows: counts per drop reason and token sums, summed per block in
    the workers; only one small row per block and reason reaches the driver."""
    counts: dict[str | None, list[int]] = {}
    for rec in level.map_batches(_count, batch_format="pyarrow", batch_size=None, num_cpus=_UDF_CPUS).take_all():
        c = counts.setdefault(rec["drop_reason"], [0, 0, 0])
        for i, k in enumerate(("n", "n_tokens", "prompt_tokens")):
            c[i] += rec[k]
    generated = sum(c[0] for c in counts.values())
    dropped = {k: c[0] for k, c in counts.items() if k is not None}
    gen_tokens = sum(c[1] for c in counts.values())
    t_gen = seconds["generate"]
    return {
        "level": layer.level,
        "kind": layer.kind,
        "branching": layer.branching,
        "max_new_tokens": layer.max_new_tokens,
        "parents": parents,
        "generated": generated,
        "kept": generated - sum(dropped.values()),
        "dropped": dropped,
        "generated_tokens": gen_tokens,
        "prompt_tokens": sum(c[2] for c in counts.values()),
        "generate_seconds": round(t_gen, 3),
        "dedup_seconds": round(seconds["dedup"], 3),
        "seconds": round(seconds["total"], 3),
        "tokens_per_s": round(gen_tokens / t_gen, 1) if t_gen > 0 else None,
    }


def _count(block: pa.Table) -> pa.Table:
    grouped = block.group_by("drop_reason", use_threads=False).aggregate(
        [([], "count_all"), ("n_tokens", "sum"), ("prompt_tokens", "sum")])
    return pa.table({"drop_reason": grouped["drop_reason"], "n": grouped["count_all"],
                     "n_tokens": pc.fill_null(grouped["n_tokens_sum"], 0),
                     "prompt_tokens": pc.fill_null(grouped["prompt_tokens_sum"], 0)})


# ----------------------------------------------------------------------------- question dedup


class QuestionDedup:
    """Question dedup across a run, as distributed steps: an embedder actor (started at first use), the kept
    questions' embeddings as materialized Ray Datasets, and per level a near-duplicate pass that runs in workers.

    'greedy' compares every candidate with every kept question in one task; 'cluster' fits k-means centroids on a
    sample in a task, buckets every embedding in the workers and runs the greedy pass per bucket in a few tasks. The
    driver sees only the centroids' reference and counts. First one wins in node-id order, so the same texts give
    the same kept set whatever the block layout.
    """

    def __init__(self, dcfg: DedupConfig, *, actor: Any = None) -> None:
        self._cfg = dcfg
        self._actor = actor
        self._own = actor is None  # an actor passed in belongs to the caller: close() leaves it running
        self._prev: list = []  # materialized Datasets (node_id, emb) of the questions kept at earlier levels

    def start(self) -> None:
        """Start the embedder actor without waiting: it loads while the engines start."""
        import ray

        from actors.embedder import Embedder
        from pipeline.model import embedder_path

        if self._actor is None and self._cfg.enabled:
            actor = ray.remote(Embedder).options(num_cpus=EMBEDDER_CPUS, max_restarts=-1, max_task_retries=3)
            self._actor = actor.remote(embedder_path(self._cfg.embedder), batch_size=self._cfg.batch_size)

    def _embed(self, level):
        """(node_id, emb) of the kept questions of ``level``, materialized in the object store."""
        self.start()
        from ray.data.expressions import col

        kept = level.filter(expr=col("status") == "kept").select_columns(["node_id", "text"])
        return kept.map_batches(_embed_batch, fn_kwargs={"actor": self._actor}, batch_size=4 * self._cfg.batch_size,
                                batch_format="pyarrow", num_cpus=_UDF_CPUS).materialize()

    def apply(self, level):
        """``level`` with its near-duplicate questions dropped; the kept ones join the memory."""
        import ray

        new = self._embed(level)
        n_new = new.count()
        if n_new == 0:
            return level
        c = self._cfg
        dropped = _near_duplicates(new, self._prev, n_new=n_new, threshold=c.threshold, method=c.method,
                                   block_size=c.block_size, clusters=c.clusters)
        ids = ray.remote(_id_array).options(num_cpus=0).remote(*dropped)
        self._prev.append(new.map_batches(_without, fn_kwargs={"ids": [ids]}, batch_format="pyarrow",
                                          num_cpus=_UDF_CPUS).materialize())
        return level.map_batches(_mark_near_duplicates, fn_kwargs={"ids": [ids]}, batch_format="pyarrow",
                                 num_cpus=_UDF_CPUS)

    def remember(self, level) -> None:
        """On resume: embed the kept questions of a completed question level so later levels dedup against them."""
        if self._cfg.enabled:
            self._prev.append(self._embed(level))

    def close(self) -> None:
        self._prev = []
        if self._actor is not None and self._own:
            import ray

            ray.kill(self._actor, no_restart=True)
            self._actor = None


def _embed_batch(batch: pa.Table, *, actor) -> pa.Table:
    import ray
    from ray.data.extensions import ArrowTensorArray

    emb = ray.get(actor.embed.remote(batch["text"].to_pylist()))
    return pa.table({"node_id": batch["node_id"], "emb": ArrowTensorArray.from_numpy(emb)})


_DEDUP_PARTS = 4  # tasks that share the per-bucket greedy passes of the 'cluster' method


def _near_duplicates(new, prev: list, *, n_new: int, threshold: float, method: str, block_size: int, clusters: int):
    """References to tables of the node ids in ``new`` (node_id, emb) that repeat an earlier kept question."""
    import ray

    both = new.map_batches(_tag, fn_kwargs={"is_new": True}, batch_format="pyarrow", num_cpus=_UDF_CPUS)
    if prev:
        both = both.union(*[p.map_batches(_tag, fn_kwargs={"is_new": False}, batch_format="pyarrow",
                                          num_cpus=_UDF_CPUS) for p in prev])
    if method == "cluster":
        total = n_new + sum(p.count() for p in prev)
        k = min(clusters or max(1, int(total**0.5)), total)
        stride = max(1, -(-total // SAMPLE_ROWS))
        sample = both.map_batches(_hash_sample, fn_kwargs={"stride": stride}, batch_format="pyarrow",
                                  num_cpus=_UDF_CPUS).materialize()
        centroids = ray.remote(_fit_centroids).options(num_cpus=1).remote(k, *sample.to_arrow_refs())
        both = both.map_batches(_assign, fn_kwargs={"centroids": [centroids]}, batch_format="pyarrow",
                                num_cpus=_UDF_CPUS)
    else:
        k = 1
        both = both.map_batches(_assign, fn_kwargs={"centroids": None}, batch_format="pyarrow", num_cpus=_UDF_CPUS)
    # The per-bucket passes as plain tasks, each owning the buckets b with b % parts == j: a Ray Data groupby would
    # start a hash-shuffle actor pool per level for what is a handful of tasks here.
    blocks = both.materialize().to_arrow_refs()
    parts = min(_DEDUP_PARTS, k) if method == "cluster" else 1
    task = ray.remote(_partition_duplicates).options(num_cpus=_UDF_CPUS)
    return [task.remote(j, parts, threshold, block_size, *blocks) for j in range(parts)]


def _tag(batch: pa.Table, *, is_new: bool) -> pa.Table:
    return batch.append_column("is_new", pa.array([is_new] * batch.num_rows, pa.bool_()))


def _hash_sample(batch: pa.Table, *, stride: int) -> pa.Table:
    """Rows whose id hashes to 0 mod ``stride``: a sample that does not depend on the block layout."""
    keep = [int(i[:8], 16) % stride == 0 for i in batch["node_id"].to_pylist()]
    return batch.filter(pa.array(keep, pa.bool_())).select(["node_id", "emb"])


def _fit_centroids(k: int, *blocks: pa.Table):
    """Ray task: k-means centroids (k, d) of the sampled embeddings, in node-id order (deterministic)."""
    from pipeline.dedup import fit_centroids

    table = pa.concat_tables(blocks).sort_by("node_id")
    return fit_centroids(table["emb"].combine_chunks().to_numpy(), k)


def _assign(batch: pa.Table, *, centroids) -> pa.Table:
    import numpy as np
    import ray

    from pipeline.dedup import nearest_centroid

    if centroids is None:
        bucket = np.zeros(batch.num_rows, np.int64)
    else:
        bucket = nearest_centroid(batch["emb"].combine_chunks().to_numpy(), ray.get(centroids[0]))
    return batch.append_column("bucket", pa.array(bucket, pa.int64()))


def _partition_duplicates(part: int, parts: int, threshold: float, block_size: int, *blocks: pa.Table) -> pa.Table:
    """Ray task: ids of the new rows, in the buckets of one partition, that repeat a kept one (earlier levels
    first, then earlier in node-id order within the bucket)."""
    import numpy as np

    from pipeline.dedup import dedup_mask

    table = pa.concat_tables(blocks)
    table = table.filter(pa.array(table["bucket"].to_numpy() % parts == part))
    order = pc.sort_indices(table, sort_keys=[("bucket", "ascending"), ("node_id", "ascending")]).to_numpy()
    buckets = table["bucket"].to_numpy()[order]
    is_new = table["is_new"].to_numpy(zero_copy_only=False)[order]
    emb = table["emb"].combine_chunks().to_numpy()[order] if table.num_rows else None
    ids = table["node_id"].take(pa.array(order))
    dropped = []
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(buckets)) + 1, [len(buckets)]])
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        new = is_new[lo:hi]
        keep = dedup_mask(emb[lo:hi][new], emb[lo:hi][~new], threshold=threshold, block_size=block_size)
        dropped.append(ids[lo:hi].filter(pa.array(new)).filter(pa.array(~keep)))
    return pa.table({"node_id": pa.concat_arrays([c.combine_chunks() for c in dropped]) if dropped
                     else pa.array([], pa.string())})


def _id_array(*blocks: pa.Table) -> pa.Array:
    """Ray task: the dropped ids of every bucket as one array (what the marking UDFs look up)."""
    if not blocks:
        return pa.array([], pa.string())
    return pa.concat_tables(blocks)["node_id"].combine_chunks()


def _without(batch: pa.Table, *, ids: list) -> pa.Table:
    import ray

    return batch.filter(pc.invert(pc.is_in(batch["node_id"], value_set=ray.get(ids[0]))))


def _mark_near_duplicates(batch: pa.Table, *, ids: list) -> pa.Table:
    """Drop the kept rows whose id is in the near-duplicate set (status, drop reason, no path)."""
    import ray

    hit = pc.fill_null(pc.is_in(batch["node_id"], value_set=ray.get(ids[0])), False)
    if not pc.any(hit).as_py():
        return batch
    cols = {
        "status": pc.if_else(hit, "dropped", batch["status"]),
        "drop_reason": pc.if_else(hit, pa.scalar(tree.NEAR_DUPLICATE), batch["drop_reason"]),
        "path": pc.if_else(hit, pa.scalar(None, PATH_TYPE), batch["path"]),
    }
    for name, col in cols.items():
        batch = batch.set_column(batch.schema.get_field_index(name), name, col)
    return batch


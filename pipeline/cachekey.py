"""One reuse key per stage: a hash of every config field that shapes the stage's output.

A stage writes its key next to its output (``config_hash`` in a manifest or marker) and reuses a finished output only
when the key matches. Fields that change how fast or where a stage runs (:data:`RUNTIME_FIELDS`) are left out, so
moving a run to more replicas or another port reuses what is finished; everything else in the sections a stage
reads counts. Pure: pydantic and the standard library only.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from pipeline.config import TGConfig, config_hash

__all__ = ["RUNTIME_FIELDS", "stage_key"]


# Fields that change how fast or where a stage runs, never what it writes: stage_key leaves them out, so changing
# them reuses finished outputs. Every other field of a keyed section counts.
RUNTIME_FIELDS = frozenset({
    "model.cache_dir",
    "engine.replicas", "engine.cpus_per_replica", "engine.gpus_per_replica", "engine.enforce_eager",
    "engine.enable_prefix_caching", "engine.kv_cache_gib", "engine.gpu_memory_utilization", "engine.max_num_seqs",
    "engine.batch_size", "engine.resources",
    "tree.shard_rows", "tree.dedup.block_size", "tree.dedup.batch_size",
    "train.cpus_per_worker", "train.resources_per_worker", "train.log_every", "train.checkpoint_every",
    "train.storage_path", "train.max_failures",
    "serve.host", "serve.port", "serve.cpus_per_replica", "serve.gpus_per_replica", "serve.resources",
    "serve.enforce_eager", "serve.kv_cache_gib", "serve.ready_timeout_s", "serve.server_cpus", "serve.ingress_cpus",
    "serve.gpu_memory_utilization",
    "eval.num_concurrent", "eval.batch_size",
})


def stage_key(cfg: TGConfig, *paths: str, exclude: frozenset[str] | set[str] = frozenset(), **extra: Any) -> str:
    """The reuse key of a stage's output: a :func:`config_hash` of everything that shapes it.

    Args:
        cfg: the run config.
        paths: sections or dotted fields the stage reads (``"model"``, ``"tree"``, ``"eval.retention_dialogues"``);
            their :data:`RUNTIME_FIELDS` are left out.
        exclude: further dotted fields to leave out (e.g. ``{"train.max_steps"}`` for a key that survives raising it).
        extra: values from outside the config that shape the output (a resolved model path, an input's key).

    Returns:
        16 hex digits; equal keys mean a finished output can be reused.
    """
    skip = RUNTIME_FIELDS | set(exclude)

    def strip(value: Any, prefix: str) -> Any:
        if not isinstance(value, dict):
            return value
        return {k: strip(v, f"{prefix}.{k}") for k, v in value.items() if f"{prefix}.{k}" not in skip}

    data: dict[str, Any] = {}
    for path in paths:
        value: Any = cfg
        for name in path.split("."):
            value = getattr(value, name)
        data[path] = strip(value.model_dump(mode="json") if isinstance(value, BaseModel) else value, path)
    return config_hash({"config": data, "extra": extra})

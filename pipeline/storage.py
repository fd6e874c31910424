"""Storage every node of a cluster must see: the run directory (under ``output_root``) and ``train.storage_path``.

Engine actors, Ray Data workers, training workers and served replicas on any node read and write these folders at
the same paths as the driver, so on a multi-node cluster they must be a shared filesystem mounted at the same path
everywhere. :func:`check_shared_storage` proves it at the start of a stage: the driver writes a probe file into each
folder, a task pinned to every alive node reads it back, and the probe files are removed again. A cluster of one
node (a local Ray) has nothing to check. Cloud URIs (``s3://...``) are left to Ray Train.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any, Callable

from pipeline.config import TGConfig

__all__ = ["check_shared_storage", "shared_paths", "unseen"]

PROBE_PREFIX = ".tgsft-storage-probe-"


def shared_paths(cfg: TGConfig) -> dict[str, Path]:
    """Config field -> local folder every node must see: the run directory (``output_root``) and
    ``train.storage_path`` when it is a local path."""
    paths = {"output_root": cfg.run_dir.expanduser().resolve()}
    storage = cfg.train.storage_path
    if storage and "://" not in storage:
        paths["train.storage_path"] = Path(storage).expanduser().resolve()
    return paths


def read_probes(paths: list[str]) -> list[str | None]:
    """The text of each probe file as this process sees it (None: not there or unreadable). Runs on every node."""
    out: list[str | None] = []
    for path in paths:
        try:
            out.append(Path(path).read_text())
        except OSError:
            out.append(None)
    return out


def unseen(nodes: list[dict[str, Any]], probes: dict[str, tuple[Path, str]],
           seen: dict[str, list[str | None] | None]) -> list[str]:
    """One line per node and folder whose probe the node did not read back.

    Args:
        nodes: alive nodes as ``ray.nodes()`` lists them (``NodeID``, ``NodeManagerAddress``).
        probes: config field -> (probe file, its text).
        seen: node id -> what :func:`read_probes` returned there, in ``probes`` order (None: no answer).
    """
    problems = []
    for node in nodes:
        where = f"node {node['NodeManagerAddress']} (id {node['NodeID']})"
        texts = seen.get(node["NodeID"])
        if texts is None:
            problems.append(f"{where} did not answer the storage probe")
            continue
        for (field, (path, token)), text in zip(probes.items(), texts, strict=True):
            if text != token:
                problems.append(f"{where} cannot see {path.parent} ({field})")
    return problems


def check_shared_storage(cfg: TGConfig, *, log: Callable[[str], None] = print, timeout_s: float = 300) -> int:
    """Check that every alive node of the Ray cluster sees :func:`shared_paths` (creating the folders), and log it.

    Ray must be up (or the config must name a cluster to join: ``ray.address`` or ``$RAY_ADDRESS``); without a
    cluster and before Ray starts, a run will start a local one-node Ray, so nothing is started or checked.

    Returns:
        The number of nodes checked (0 or 1: nothing to check).

    Raises:
        ValueError: a node cannot see a folder or did not answer; names the node, the folder and the config field.
    """
    import ray

    from pipeline.runtime import init_ray

    if not ray.is_initialized():
        if not (cfg.ray.address or os.environ.get("RAY_ADDRESS")):
            return 0
        init_ray(address=cfg.ray.address, num_cpus=cfg.ray.num_cpus, dashboard_host=cfg.ray.dashboard_host)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) < 2:
        return len(nodes)
    probes: dict[str, tuple[Path, str]] = {}
    try:
        for field, folder in shared_paths(cfg).items():
            folder.mkdir(parents=True, exist_ok=True)
            token = secrets.token_hex(16)
            probes[field] = (folder / f"{PROBE_PREFIX}{token}", token)
            probes[field][0].write_text(token)
        seen = _read_everywhere(nodes, [str(path) for path, _ in probes.values()], timeout_s)
    finally:
        for path, _ in probes.values():
            path.unlink(missing_ok=True)
    if problems := unseen(nodes, probes, seen):
        raise ValueError("storage: " + "; ".join(problems) + ". Every node of the cluster must see output_root and "
                         "train.storage_path at the same path (a shared filesystem), or train.storage_path must be a "
                         "cloud URI")
    folders = ", ".join(f"{field} {path.parent}" for field, (path, _) in probes.items())
    log(f"storage: all {len(nodes)} nodes see {folders}")
    return len(nodes)


def _read_everywhere(nodes: list[dict[str, Any]], paths: list[str], timeout_s: float) -> dict[str, list | None]:
    """Node id -> :func:`read_probes` run on that node (a zero-CPU task pinned to it); None for no answer."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(read_probes)
    refs = {n["NodeID"]: task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(paths) for n in nodes}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    done = set(ready)
    seen: dict[str, list | None] = {}
    for node_id, ref in refs.items():
        try:
            seen[node_id] = ray.get(ref) if ref in done else None
        except ray.exceptions.RayError:
            seen[node_id] = None
    return seen

"""Connecting to Ray: a running cluster (``ray.address``, ``$RAY_ADDRESS``, or inside ``ray job submit``) or a local
single-node Ray bound to loopback."""

from __future__ import annotations

import os

__all__ = ["init_ray"]

# Logical CPUs a local Ray gets at least: engine, Ray Data tasks, 2 train workers and Serve replicas must all be
# placeable on a 2-core machine; they time-share the cores.
_MIN_LOCAL_CPUS = 8


def init_ray(*, address: str | None = None, num_cpus: int | None = None, dashboard_host: str = "127.0.0.1"):
    """Start or join Ray once per process and return the ``ray`` module.

    Args:
        address: cluster address; None joins ``$RAY_ADDRESS`` if set (as under ``ray job submit``), else starts a
            local Ray.
        num_cpus: logical CPUs of a local Ray (default max(8, 2 x cores)).
        dashboard_host: bind address of a local dashboard.
    """
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        cpus = num_cpus or max(_MIN_LOCAL_CPUS, 2 * (os.cpu_count() or 1))
        # Ray starts its workers at nice 15 by default: on a workstation the training worker and the engines would
        # yield to anything else running. A local Ray is this run's own; its workers get normal priority.
        os.environ.setdefault("RAY_worker_niceness", "0")
        # address="local": always a new single-node Ray, even when a `ray start` cluster runs on this machine
        # (joining that one is an explicit choice: ray.address="auto"). The dashboard also serves the State API
        # that Ray Train's placement-group cleaner polls.
        ray.init(address="local", num_cpus=cpus, dashboard_host=dashboard_host, include_dashboard=True,
                 log_to_driver=True)
    return ray

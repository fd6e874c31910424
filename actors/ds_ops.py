"""DeepSpeed's JIT-built C++ ops, loaded so that a load killed half-way cannot hang every later run.

torch builds and loads a JIT extension under a bare ``lock`` file (``torch.utils.file_baton``) that a killed process
leaves behind; every later load of that op then waits on it forever. Here each op is loaded under an ``flock`` on a
sidecar file in the same build directory, which the kernel releases when its holder dies: a ``lock`` found while
holding it belongs to no live loader of ours, so it is removed. DeepSpeed caches a loaded op per process, so its own
later load (in ``deepspeed.init_distributed`` or the optimizer) reuses the one loaded here.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from typing import Any

__all__ = ["load_guarded", "preload_ops"]


def load_guarded(build_dir: str, load: Callable[[], Any]) -> tuple[Any, bool]:
    """Run ``load`` (a torch JIT build-and-load into ``build_dir``) under an flock there.

    Returns:
        ``(what load returned, whether a stale torch lock file was removed first)``.
    """
    os.makedirs(build_dir, exist_ok=True)
    with open(os.path.join(build_dir, "tgsft.flock"), "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # waits for a live loader; a dead one's lock is already released
        stale = os.path.join(build_dir, "lock")
        removed = os.path.exists(stale)
        if removed:
            os.remove(stale)
        return load(), removed


def preload_ops(ds_config: dict[str, Any], *, log: Callable[[str], None] = print) -> list[str]:
    """Load the JIT ops DeepSpeed will load for ``ds_config`` and this machine, each under :func:`load_guarded`.

    The CPU shared-memory collectives, and CPU Adam when the optimizer is offloaded; an op this machine cannot use
    is skipped, as DeepSpeed skips it.

    Args:
        ds_config: the DeepSpeed config of the run.
        log: where to report a removed stale lock.

    Returns:
        The names of the ops loaded.
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    builder_names = ["ShareMemCommBuilder"]
    if ds_config["zero_optimization"].get("offload_optimizer"):
        builder_names.append("CPUAdamBuilder")
    loaded = []
    for builder_name in builder_names:
        builder = get_accelerator().create_op_builder(builder_name)
        if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            continue
        build_dir = _get_build_directory(builder.name, verbose=False)
        _, removed = load_guarded(build_dir, builder.load)
        if removed:
            log(f"removed a stale build lock left by a killed process: {os.path.join(build_dir, 'lock')}")
        loaded.append(builder.name)
    return loaded

"""lm-eval tasks shipped with tgsft: offline mirrors of standard tasks and the project's own ``tgsft_general``.

The YAMLs here are static; the upstream data directory reaches their loaders (``loaders.py``) at run time through
the TaskManager metadata key ``data_dir``, so nothing is generated or downloaded:

    task_manager(data_dir="/data/eval").load(["tgsft_arc_easy", "arc_easy"])   # mirrors and standard tasks

Importing this package does not import lm_eval.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

__all__ = ["MIRRORS", "TASKS_DIR", "task_manager"]

TASKS_DIR = Path(__file__).parent

# mirror task -> the standard lm-eval task whose prompts and metrics it reproduces
MIRRORS: dict[str, str] = {
    "tgsft_arc_easy": "arc_easy",
    "tgsft_arc_challenge": "arc_challenge",
    "tgsft_piqa": "piqa",
    "tgsft_sciq": "sciq",
    "tgsft_winogrande": "winogrande",
    "tgsft_gsm8k": "gsm8k",
    "tgsft_truthfulqa_mc1": "truthfulqa_mc1",
    "tgsft_truthfulqa_mc2": "truthfulqa_mc2",
}


def task_manager(*, data_dir: str | Path | None, include_path: str | Path | None = None) -> Any:
    """An ``lm_eval.tasks.TaskManager`` that knows the standard tasks, the ones in this folder and, with
    ``include_path``, the user's own.

    Built once per (data directory, include path) in a process and then shared: indexing lm-eval's ~15 k task
    files takes ~10 s, and a run asks for it when checking task names and again for every evaluated model.

    Args:
        data_dir: directory of upstream-format files for the mirrors (None: mirrors fail when loaded, naming the
            setting to give).
        include_path: a folder of lm-eval task YAMLs (searched recursively, as ``lm_eval --include_path`` does).

    Returns:
        The TaskManager; its ``load([...])`` builds tasks by name.
    """
    return _manager(*(str(Path(p).expanduser().resolve()) if p else None for p in (data_dir, include_path)))


@functools.lru_cache(maxsize=None)
def _manager(data_dir: str | None, include_path: str | None) -> Any:
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR)] + ([include_path] if include_path else [])
    return TaskManager(include_path=paths, metadata={"data_dir": data_dir} if data_dir else {})

"""Reference questions for knowledge coverage (:func:`pipeline.textmetrics.coverage`): the eval tasks' questions, or any
file of questions.

Reads the offline eval mirrors' upstream files (``eval.data_dir``, see :mod:`pipeline.tasks.loaders`),
``tgsft_general``'s built-in items, or a user's ``.txt`` / ``.json`` / ``.jsonl`` file. Pure Python.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["read_reference", "reference_questions"]


def _arc_question(row: dict) -> str:
    return row["question"]["stem"]


# upstream file key (pipeline.tasks.loaders.FILES) -> its question text
_QUESTION: dict[str, Callable[[dict], str]] = {
    "arc_easy": _arc_question,
    "arc_challenge": _arc_question,
    "piqa": lambda r: r["goal"],
    "sciq": lambda r: r["question"],
    "winogrande": lambda r: r["sentence"],
    "gsm8k": lambda r: r["question"],
    "truthfulqa": lambda r: r["question"],
}


def reference_questions(tasks: Sequence[str], data_dir: str | Path | None) -> dict[str, list[str]]:
    """The questions of the eval tasks tgsft reads offline: ``tgsft_general``'s items and, with ``data_dir``, the
    offline mirrors' upstream files (tasks tgsft cannot read offline are skipped).

    Returns:
        source (``tgsft_general`` or the upstream file key, e.g. ``arc_easy``) -> its questions.

    Raises:
        FileNotFoundError: a mirror's file is missing under ``data_dir``.
    """
    from pipeline.tasks.loaders import GENERAL_ITEMS, find_file, read_rows

    out: dict[str, list[str]] = {}
    for task in tasks:
        if task == "tgsft_general":
            out[task] = [q for q, _, _ in GENERAL_ITEMS]
            continue
        key = task.removeprefix("tgsft_").removesuffix("_mc1").removesuffix("_mc2")  # both TruthfulQA tasks: one file
        if task.startswith("tgsft_") and key in _QUESTION and data_dir and key not in out:
            out[key] = [_QUESTION[key](r) for r in read_rows(find_file(key, data_dir))]
    return out


def _row_question(row: Any) -> str | None:
    if isinstance(row, str):
        return row
    for key in ("question", "goal", "sentence", "prompt", "text", "instruction"):
        value = row.get(key)
        if isinstance(value, dict):
            value = value.get("stem")
        if isinstance(value, str):
            return value
    for m in row.get("messages") or row.get("conversations") or []:
        if m.get("role", m.get("from")) in ("user", "human"):
            return m.get("content", m.get("value"))
    return None


def read_reference(path: str | Path) -> dict[str, list[str]]:
    """Reference questions from a file or an eval data directory.

    A directory is read as ``eval.data_dir``: every upstream file tgsft knows (ARC, PIQA, SciQ, WinoGrande, GSM8K,
    TruthfulQA) that is present, one source each. A ``.txt`` file holds one question per line; a ``.json`` /
    ``.jsonl`` file holds strings or rows with a question field (``question`` (or ARC's ``question.stem``),
    ``goal``, ``sentence``, ``prompt``, ``text``, ``instruction``) or a chat whose first user turn is the question.

    Raises:
        FileNotFoundError: ``path`` does not exist, or a directory holds no known file.
        ValueError: a row without a question (names the file and row).
    """
    from pipeline.tasks.loaders import FILES, find_file, read_rows

    path = Path(path).expanduser()
    if path.is_dir():
        out = {}
        for key in FILES:
            try:
                out[key] = [_QUESTION[key](r) for r in read_rows(find_file(key, path))]
            except FileNotFoundError:
                continue
        if not out:
            raise FileNotFoundError(f"{path}: no known eval file (e.g. arc/ARC-Easy-Dev.jsonl, sciq/valid.json)")
        return out
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such reference file or directory")
    if path.suffix == ".txt":
        return {path.stem: [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]}
    questions = []
    for i, row in enumerate(read_rows(path), start=1):
        q = _row_question(row)
        if not q:
            raise ValueError(f"{path}: row {i}: no question field (question, goal, sentence, prompt, text, "
                             "instruction, or a user message)")
        questions.append(q)
    return {path.stem: questions}

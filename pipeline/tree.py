"""Pure tree logic for Tree Generation: layer schedule, node ids and seeds, frontier expansion, output filters,
root-to-leaf path extraction.

Layers are numbered from 1. In an ``sft`` tree odd layers are *question* layers (the model writes the user turn)
and even layers are *answer* layers; a ``pt`` tree has only *text* layers (plain continuation). Layer i gives every
kept node of layer i-1 exactly N_i children, each with its own seed, generated with at most L_i new tokens.

No Ray, vLLM or torch here: everything works on plain lists and dicts so it can be unit-tested in milliseconds.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

__all__ = [
    "PATH_KEYS",
    "ROOT_ID",
    "Layer",
    "check_levels",
    "complete_paths",
    "Outcome",
    "child_seed",
    "classify",
    "expand",
    "grow_paths",
    "mark_duplicates",
    "max_nodes",
    "normalize",
    "path_messages",
    "layer_kind",
    "node_id",
    "schedule",
    "trim_to_sentence",
]

ROOT_ID = "root"

# Drop reasons, in the order they are checked.
EMPTY, TRUNCATED, ROLE_MARKER, REPETITION, DUPLICATE, NEAR_DUPLICATE = (
    "empty",
    "truncated",
    "role_marker",
    "repetition",
    "duplicate",
    "near_duplicate",
)


@dataclass(frozen=True)
class Layer:
    level: int  # 1-based
    kind: str  # "question" | "answer" | "text"
    branching: int  # N_i
    max_new_tokens: int  # L_i


def layer_kind(level: int, mode: str) -> str:
    """'question' on odd levels and 'answer' on even levels of an sft tree; 'text' for pt trees."""
    if mode == "pt":
        return "text"
    return "question" if level % 2 == 1 else "answer"


def schedule(branching: Sequence[int], max_new_tokens: Sequence[int], mode: str = "sft") -> list[Layer]:
    """The layers of a tree, with the node count each level reaches if nothing is dropped."""
    return [
        Layer(level=i + 1, kind=layer_kind(i + 1, mode), branching=n, max_new_tokens=length)
        for i, (n, length) in enumerate(zip(branching, max_new_tokens, strict=True))
    ]


def max_nodes(branching: Sequence[int]) -> list[int]:
    """Upper bound of nodes per level: the running product of N_i."""
    out, total = [], 1
    for n in branching:
        total *= n
        out.append(total)
    return out


def _digest(*parts: object) -> bytes:
    return hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()


def child_seed(run_seed: int, parent_id: str, branch: int) -> int:
    """Sampling seed of a child: a deterministic hash of the run seed, its parent and its branch index (< 2**31)."""
    return int.from_bytes(_digest("seed", run_seed, parent_id, branch), "big") & 0x7FFFFFFF


def node_id(parent_id: str, branch: int, seed: int) -> str:
    """Node id: 16 hex digits hashing the parent id, branch index and seed, stable across reruns."""
    return _digest("node", parent_id, branch, seed).hex()


def expand(parents: Iterable[dict], *, level: int, branching: int, run_seed: int) -> list[dict]:
    """Children of the kept parents of a level: ``branching`` per parent, each with its own id and seed.

    Args:
        parents: dicts with ``node_id`` and ``group`` (the level-1 ancestor, used to route whole subtrees to one
            engine so their shared prefixes hit its cache); the root has ``node_id == ROOT_ID``.
        level: level of the children.
        branching: N_i.
        run_seed: ``tree.seed``.

    Returns:
        Child dicts with ``node_id, parent_id, level, branch, seed, group`` in parent order, then branch order.
    """
    children = []
    for p in parents:
        for b in range(branching):
            seed = child_seed(run_seed, p["node_id"], b)
            nid = node_id(p["node_id"], b, seed)
            group = nid if p["node_id"] == ROOT_ID else p["group"]
            children.append(
                {"node_id": nid, "parent_id": p["node_id"], "level": level, "branch": b, "seed": seed, "group": group}
            )
    return children


# ----------------------------------------------------------------------------- filters


@dataclass(frozen=True)
class Outcome:
    status: str  # "kept" | "dropped"
    drop_reason: str | None
    text: str  # the text to store (trimmed when a truncated output was cut back to a full sentence)


_WORD = re.compile(r"\w+")
_SENTENCE_END = re.compile(r"[.!?。](?:[\"')\]]*)(?=\s|$)|\n\n")


def _is_loop(text: str, n: int, fraction: float) -> bool:
    """True if one word n-gram covers at least ``fraction`` of all n-grams (a repetition loop)."""
    words = _WORD.findall(text.lower())
    if len(words) < 4 * n:
        return False
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    top = grams.most_common(1)[0][1]
    return top * n / len(words) >= fraction


def trim_to_sentence(text: str, *, min_share: float = 0.5) -> str | None:
    """Cut a truncated text back to its last complete sentence; None if that keeps less than ``min_share``."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    if not ends or ends[-1] < min_share * len(text):
        return None
    return text[: ends[-1]].rstrip()


def classify(
    text: str,
    finish_reason: str,
    *,
    kind: str,
    markers: Sequence[str],
    truncated: str = "trim",
    min_chars: int = 1,
    repeat_ngram: int = 4,
    repeat_fraction: float = 0.5,
) -> Outcome:
    """Keep or drop one generated text, with the reason.

    Order: empty; truncated (hit L_i without end-of-turn: 'drop' drops it, 'trim' cuts it back to its last full
    sentence and drops it only if that loses more than half, 'keep' keeps it; plain text layers are continuations
    by design and never count as truncated); role markers leaking into the text; repetition loops.
    Exact and near duplicates need the whole level: see :func:`mark_duplicates` and ``pipeline.dedup``.
    """
    stripped = text.strip()
    if len(stripped) < min_chars:
        return Outcome("dropped", EMPTY, text)
    if finish_reason == "length" and kind != "text" and truncated != "keep":
        trimmed = trim_to_sentence(stripped) if truncated == "trim" else None
        if trimmed is None:
            return Outcome("dropped", TRUNCATED, text)
        text = stripped = trimmed
    if any(m in text for m in markers):
        return Outcome("dropped", ROLE_MARKER, text)
    if _is_loop(stripped, repeat_ngram, repeat_fraction):
        return Outcome("dropped", REPETITION, text)
    return Outcome("kept", None, text)


def normalize(text: str) -> str:
    """Whitespace- and case-folded text for exact-duplicate checks."""
    return " ".join(text.lower().split())


def mark_duplicates(rows: Sequence[dict], *, seen: set | None = None) -> list[bool]:
    """True for each kept row whose normalized text repeats an earlier kept sibling (same parent).

    ``seen`` carries the kept (parent, text) keys over from earlier calls, for siblings that come in chunks.
    """
    seen = set() if seen is None else seen
    out = []
    for r in rows:
        key = (r["parent_id"], normalize(r["text"]))
        dup = r["status"] == "kept" and key in seen
        if r["status"] == "kept" and not dup:
            seen.add(key)
        out.append(dup)
    return out


# ----------------------------------------------------------------------------- paths


def grow_paths(paths: Mapping[str, tuple], rows: Iterable[dict]) -> dict[str, tuple]:
    """Root-to-node paths of a level's kept nodes: each is its parent's path plus the node itself.

    Args:
        paths: node id -> path (tuple of node dicts from level 1 down) for the kept nodes of the level above;
            ``{ROOT_ID: ()}`` above level 1.
        rows: the level's nodes (``node_id, parent_id, status, kind, text``).

    Returns:
        node id -> path for every kept row whose parent has a path. At the last level these are the dialogues.
        Path nodes are slim dicts (``node_id, kind, text, n_tokens``, those present in the row), not the rows:
        paths live for the whole run, and holding full rows kept every field of every kept node in memory.
    """
    return {
        r["node_id"]: paths[r["parent_id"]] + ({k: r[k] for k in PATH_KEYS if k in r},)
        for r in rows
        if r["status"] == "kept" and r["parent_id"] in paths
    }


PATH_KEYS = ("node_id", "kind", "text", "n_tokens")  # what prompts and dialogues read from a path node


def path_messages(system: list[dict], path: Sequence[dict]) -> list[dict]:
    """Hugging Face chat messages for one sft path: the root's system message, then user/assistant turns."""
    roles = {"question": "user", "answer": "assistant"}
    return list(system) + [{"role": roles[n["kind"]], "content": n["text"]} for n in path]


# ----------------------------------------------------------------------------- the completeness promise


def check_levels(levels: Sequence[Sequence[Mapping]], *, branching: Sequence[int], run_seed: int) -> list[str]:
    """Problems that break a corpus's completeness (empty: complete), whatever the texts are.

    The promise a resumed (or any) corpus keeps: every kept node of level i-1 (the root above level 1) has exactly
    N_i children at level i, with branches 0..N_i-1 and ids and seeds derived from parent, branch and run seed; no
    node is duplicated or orphaned; every node is kept, or dropped with a reason. Which nodes are kept depends on
    the generated texts and may differ between two runs; this check does not.

    Args:
        levels: each level's node rows (``node_id, parent_id, branch, seed, status, drop_reason``), level 1 first.
        branching: N_i per level.
        run_seed: ``tree.seed``.
    """
    problems: list[str] = []
    parents = [ROOT_ID]
    for level, (rows, n) in enumerate(zip(levels, branching, strict=True), start=1):
        expected = {c["node_id"]: c for c in expand(({"node_id": p, "group": None} for p in parents),
                                                    level=level, branching=n, run_seed=run_seed)}
        counts = Counter(r["node_id"] for r in rows)
        if dups := sorted(k for k, c in counts.items() if c > 1):
            problems.append(f"level {level}: {len(dups)} duplicate node id(s), e.g. {dups[0]}")
        if missing := expected.keys() - counts.keys():
            problems.append(f"level {level}: {len(missing)} child(ren) of kept parents missing")
        if extra := counts.keys() - expected.keys():
            problems.append(f"level {level}: {len(extra)} node(s) that are no child of a kept level-{level - 1} node")
        for r in rows:
            want = expected.get(r["node_id"])
            if want and (r["parent_id"], r["branch"], r["seed"]) != (want["parent_id"], want["branch"], want["seed"]):
                problems.append(f"level {level}: node {r['node_id']} has another parent, branch or seed than its id")
            if (r["status"], r["drop_reason"] is None) not in {("kept", True), ("dropped", False)}:
                problems.append(f"level {level}: node {r['node_id']} is {r['status']!r} with drop reason "
                                f"{r['drop_reason']!r}")
        parents = sorted(r["node_id"] for r in rows if r["status"] == "kept")
    return problems


def complete_paths(levels: Sequence[Sequence[Mapping]]) -> set[tuple[str, ...]]:
    """Node-id paths from level 1 to every kept node of the last level through kept nodes only: the dialogues."""
    paths = {ROOT_ID: ()}
    for rows in levels:
        paths = grow_paths(paths, rows)
    return {tuple(n["node_id"] for n in p) for p in paths.values()}

"""Mixing the domain set with the TG corpus.

Reads validated domain examples (:mod:`pipeline.data`) and the TG corpus's ``dialogues/part-*.parquet``; writes the
mix as ``<out>/mix/part-*.parquet`` (:data:`MIX_SCHEMA`, one row per training example, each tagged with its
``source``) and ``<out>/mix/manifest.json`` (counts, tokens, the achieved ratio, repeats).

Budget rules:

- Every domain example is used exactly once per epoch; TG rows are *added* so that TG makes up ``tg_ratio`` of the
  mix, counted in examples (``n_tg = round(n_domain * r / (1 - r))``) or in tokens (TG rows are added until their
  tokens reach ``domain_tokens * r / (1 - r)``, stopping at the row that lands closest).
- TG rows are drawn in a seeded permutation. If the corpus has too few rows the draw continues with a fresh
  permutation (rows repeat as evenly as possible, "sampling with replacement") and the manifest records
  ``tg_repeated: true`` and how many rows are repeats: the ratio is the experimental variable, so it is kept.
- The dialogues chosen by :func:`pipeline.corpus.heldout_ids` are the retention probe's held-out slice and are
  removed before anything is drawn.
- Rows of a TG-PT corpus carry ``text`` (loss on all tokens) instead of ``messages``.
- The written mix is shuffled with ``seed``; epoch ``e`` trains on it in the order :func:`epoch_order` gives
  (a permutation seeded with ``seed + e``).

Pure functions over Arrow tables (no Ray, torch); token counting is a callable the driver passes in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import pyarrow as pa

from pipeline.corpus import MESSAGE_TYPE, atomic_write_text, heldout_ids, read_dialogues, write_table

__all__ = ["MIX_SCHEMA", "build_mix", "epoch_order", "load_tg", "write_mix"]

MIX_SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # domain-<index> or the TG dialogue_id
        ("source", pa.string()),  # "domain" | "tg"
        ("messages", pa.list_(MESSAGE_TYPE)),  # dialogue; empty for TG-PT rows
        ("text", pa.string()),  # TG-PT plain text; null for dialogues
    ]
)

CountTokens = Callable[[list[dict] | None, str | None], int]  # (messages, text) -> tokens


def load_tg(corpus_dir: Path, *, retention_dialogues: int) -> tuple[pa.Table, dict[str, Any]]:
    """The TG corpus's dialogues minus the retention probe's held-out slice.

    Args:
        corpus_dir: a ``tgsft generate`` output directory.
        retention_dialogues: size of the held-out slice (``eval.retention_dialogues``).

    Returns:
        ``(table, stats)``: rows with ``dialogue_id``, ``messages``, ``text``; stats count available and held-out rows.

    Raises:
        FileNotFoundError: the corpus has no dialogue parts.
    """
    table = read_dialogues(corpus_dir)
    ids = table.column("dialogue_id").to_pylist()
    held = heldout_ids(ids, retention_dialogues)
    keep = pa.array([i not in held for i in ids], type=pa.bool_())
    kept = table.filter(keep).select(["dialogue_id", "messages", "text"])
    stats = {"corpus": str(corpus_dir), "tg_rows_total": len(ids), "tg_heldout_excluded": len(ids) - kept.num_rows}
    return kept, stats


def epoch_order(n: int, *, seed: int, epoch: int) -> np.ndarray:
    """Row order of the mix for one epoch: a permutation of ``range(n)`` seeded with ``seed + epoch``."""
    return np.random.default_rng(seed + epoch).permutation(n)


def _draw(n_avail: int, rng: np.random.Generator, need: Callable[[int, int], bool]) -> list[int]:
    """Indices drawn permutation after permutation while ``need(count, next_index)`` says to take another."""
    out: list[int] = []
    while True:
        for i in rng.permutation(n_avail):
            if not need(len(out), int(i)):
                return out
            out.append(int(i))


def _draw_tokens(tg_msgs: list, tg_text: list, rng: np.random.Generator, *, target_tokens: float,
                 count_tokens: CountTokens) -> list[int]:
    """TG rows drawn until their tokens reach ``target_tokens``, stopping at the row that lands closest."""
    cache: dict[int, int] = {}

    def tokens_of(i: int) -> int:
        if i not in cache:
            cache[i] = count_tokens(tg_msgs[i] or None, tg_text[i])
        return cache[i]

    total = [0]

    def need(_count: int, i: int) -> bool:
        # Take row i if that lands closer to the target than stopping here.
        if abs(total[0] + tokens_of(i) - target_tokens) < abs(total[0] - target_tokens):
            total[0] += tokens_of(i)
            return True
        return False

    return _draw(len(tg_msgs), rng, need)


def _mixed_table(domain: Sequence[list[dict]], tg: pa.Table | None, picks: list[int], *, tg_msgs: list,
                 tg_text: list, rng: np.random.Generator) -> pa.Table:
    """Every domain example and the picked TG rows (repeats included), shuffled with ``rng``."""
    ids = [f"domain-{i:06d}" for i in range(len(domain))]
    sources = ["domain"] * len(domain)
    messages: list[list[dict]] = [list(m) for m in domain]
    texts: list[str | None] = [None] * len(domain)
    if picks:
        tg_ids = tg.column("dialogue_id").to_pylist()
        for i in picks:
            ids.append(tg_ids[i])
            sources.append("tg")
            messages.append(tg_msgs[i] or [])
            texts.append(tg_text[i] if not tg_msgs[i] else None)
    order = rng.permutation(len(ids))
    return pa.table(
        {
            "id": [ids[i] for i in order],
            "source": [sources[i] for i in order],
            "messages": [messages[i] for i in order],
            "text": [texts[i] for i in order],
        },
        schema=MIX_SCHEMA,
    )


def build_mix(
    domain: Sequence[list[dict]],
    tg: pa.Table | None,
    *,
    tg_ratio: float,
    by: Literal["examples", "tokens"] = "examples",
    seed: int = 0,
    count_tokens: CountTokens | None = None,
) -> tuple[pa.Table, dict[str, Any]]:
    """Mix every domain example with TG rows drawn to reach ``tg_ratio``.

    Args:
        domain: validated domain dialogues.
        tg: TG rows (``dialogue_id``, ``messages``, ``text``) with the held-out slice already removed; None when
            ``tg_ratio`` is 0.
        tg_ratio: TG share of the mix, 0 <= r < 1.
        by: count the ratio in ``examples`` or ``tokens``.
        seed: draw and shuffle seed.
        count_tokens: ``(messages, text) -> tokens``; required for ``by="tokens"``, and used for the token counts
            of the stats when given.

    Returns:
        ``(table, stats)``: the shuffled mix (:data:`MIX_SCHEMA`) and JSON-ready statistics.

    Raises:
        ValueError: bad ratio, no domain examples, or no TG rows while ``tg_ratio > 0``.
    """
    if not 0 <= tg_ratio < 1:
        raise ValueError(f"tg_ratio={tg_ratio}: must be in [0, 1)")
    if not domain:
        raise ValueError("no domain examples to mix")
    if by == "tokens" and count_tokens is None:
        raise ValueError("mixing by tokens needs count_tokens")
    rng = np.random.default_rng(seed)
    dom_tokens = [count_tokens(m, None) for m in domain] if count_tokens else []

    picks: list[int] = []
    tg_tokens: list[int] = []
    tg_msgs: list = []
    tg_text: list = []
    n_avail = 0 if tg is None else tg.num_rows
    if tg_ratio > 0:
        if n_avail == 0:
            raise ValueError("tg_ratio > 0 but the TG corpus has no rows left after removing the held-out slice")
        tg_msgs, tg_text = tg.column("messages").to_pylist(), tg.column("text").to_pylist()
        share = tg_ratio / (1 - tg_ratio)
        if by == "examples":
            target = round(len(domain) * share)
            picks = _draw(n_avail, rng, lambda count, _i: count < target)
        else:
            picks = _draw_tokens(tg_msgs, tg_text, rng, target_tokens=sum(dom_tokens) * share,
                                 count_tokens=count_tokens)
        if count_tokens:
            tg_tokens = [count_tokens(tg_msgs[i] or None, tg_text[i]) for i in picks]

    table = _mixed_table(domain, tg, picks, tg_msgs=tg_msgs, tg_text=tg_text, rng=rng)
    unique = len(set(picks))
    stats: dict[str, Any] = {
        "tg_ratio": tg_ratio,
        "by": by,
        "seed": seed,
        "rows": table.num_rows,
        "domain_examples": len(domain),
        "tg_examples": len(picks),
        "tg_available": n_avail,
        "tg_unique": unique,
        "tg_repeated": len(picks) > unique,
        "tg_repeats": len(picks) - unique,
        "tg_share_examples": len(picks) / table.num_rows,
    }
    if count_tokens:
        d, t = sum(dom_tokens), sum(tg_tokens)
        stats.update(domain_tokens=d, tg_tokens=t, tg_share_tokens=t / (d + t) if d + t else 0.0)
    return table, stats


def write_mix(table: pa.Table, stats: dict[str, Any], out_dir: Path, *, shard_rows: int = 50_000) -> Path:
    """Write the mix as ``out_dir/part-*.parquet`` plus ``out_dir/manifest.json``; both appear atomically.

    Returns:
        ``out_dir``.
    """
    write_table(table.cast(MIX_SCHEMA), out_dir, shard_rows=shard_rows)
    atomic_write_text(out_dir / "manifest.json", json.dumps(stats, indent=2) + "\n")
    return out_dir

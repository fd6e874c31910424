"""Mixing the domain set with the TG corpus.

Reads validated domain examples (:mod:`pipeline.data`) and the TG corpus's ``dialogues/part-*.parquet``; writes the
mix as ``<out>/mix/part-*.parquet`` (:data:`MIX_SCHEMA`, one row per training example, each tagged with its
``source``) and ``<out>/mix/manifest.json`` (counts, tokens, the achieved ratio, repeats).

Budget rules:

- Every domain example is used exactly once per epoch; TG rows are *added* so that TG makes up ``tg_ratio`` of
  each epoch, counted in examples (``n_tg = round(n_domain * r / (1 - r))``) or in tokens (TG rows are added until
  their tokens reach ``domain_tokens * r / (1 - r)``, stopping at the row that lands closest).
- Each epoch draws its own TG rows, continuing one seeded stream of permutations of the corpus: a row comes back
  only after every other row has been used, so a corpus ``k`` times the size of one epoch's draw is seen once over
  ``k`` epochs. If the corpus is smaller than the whole training's draw, rows repeat as evenly as possible
  ("sampling with replacement") and the manifest records ``tg_repeated: true``, ``tg_repeats`` and
  ``tg_max_uses``: the ratio is the experimental variable, so it is kept.
- The dialogues chosen by :func:`pipeline.corpus.heldout_ids` are the retention probe's held-out slice and are
  removed before anything is drawn.
- Rows of a TG-PT corpus carry ``text`` (loss on all tokens) instead of ``messages``.
- The mix holds every domain example once (``epoch`` null: every epoch) and each epoch's TG rows (``epoch`` = e).
  The domain rows and epoch 0's TG rows are shuffled with ``seed``; the later epochs' TG rows follow. Epoch ``e``
  trains on the rows it holds in the order :func:`epoch_order` gives (a permutation seeded with ``seed + e``;
  :func:`epoch_rows`), so more epochs extend the stream of fewer.

Pure functions over Arrow tables (no Ray, torch); token counting is a callable the driver passes in.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.corpus import MESSAGE_TYPE, atomic_write_text, heldout_ids, read_dialogues, write_table

__all__ = ["MIX_SCHEMA", "build_mix", "epoch_order", "epoch_rows", "load_tg", "write_mix"]

MIX_SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # domain-<index> or the TG dialogue_id
        ("source", pa.string()),  # "domain" | "tg"
        ("messages", pa.list_(MESSAGE_TYPE)),  # dialogue; empty for TG-PT rows
        ("text", pa.string()),  # TG-PT plain text; null for dialogues
        ("epoch", pa.int32()),  # the epoch a TG row is drawn for; null for domain rows (every epoch)
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


def epoch_rows(mix: pa.Table, *, seed: int, epoch: int) -> pa.Table:
    """The rows epoch ``epoch`` trains on (every domain row and that epoch's TG rows) in their epoch order.

    Raises:
        ValueError: the mix has TG rows but none drawn for ``epoch`` (it was built for fewer epochs).
    """
    tags = mix.column("epoch")
    last = pc.max(tags).as_py()  # None: no TG rows
    if last is not None and epoch > last:
        raise ValueError(f"the mix holds no TG rows for epoch {epoch}: build it with epochs > {epoch}")
    rows = mix.filter(pc.or_kleene(pc.is_null(tags), pc.equal(tags, epoch)))
    return rows.take(epoch_order(rows.num_rows, seed=seed, epoch=epoch))


def _permutations(n: int, rng: np.random.Generator) -> Iterator[int]:
    """Indices of ``range(n)``, permutation after permutation, without end."""
    while True:
        yield from (int(i) for i in rng.permutation(n))


def _draw(stream: Iterator[int], need: Callable[[int, int], bool]) -> tuple[list[int], Iterator[int]]:
    """Indices taken from ``stream`` while ``need(count, next_index)`` says to take another, and the stream with the
    first index not taken put back."""
    out: list[int] = []
    for i in stream:
        if not need(len(out), i):
            return out, itertools.chain([i], stream)
        out.append(i)
    raise AssertionError("the permutation stream never ends")


def _token_need(tokens_of: Callable[[int], int], target_tokens: float) -> Callable[[int, int], bool]:
    """Take row i while that lands closer to ``target_tokens`` than stopping (the row that lands closest)."""
    total = [0]

    def need(_count: int, i: int) -> bool:
        if abs(total[0] + tokens_of(i) - target_tokens) < abs(total[0] - target_tokens):
            total[0] += tokens_of(i)
            return True
        return False

    return need


def _mixed_table(domain: Sequence[list[dict]], tg: pa.Table | None, picks: list[list[int]], *, tg_msgs: list,
                 tg_text: list, first: np.ndarray) -> pa.Table:
    """Every domain example and epoch 0's TG rows in the order ``first``, then the later epochs' TG rows."""
    ids = [f"domain-{i:06d}" for i in range(len(domain))]
    sources = ["domain"] * len(domain)
    messages: list[list[dict]] = [list(m) for m in domain]
    texts: list[str | None] = [None] * len(domain)
    epochs: list[int | None] = [None] * len(domain)
    tg_ids = tg.column("dialogue_id").to_pylist() if tg is not None else []
    for e, epoch_picks in enumerate(picks):
        for i in epoch_picks:
            ids.append(tg_ids[i])
            sources.append("tg")
            messages.append(tg_msgs[i] or [])
            texts.append(tg_text[i] if not tg_msgs[i] else None)
            epochs.append(e)
    order = [int(i) for i in first] + list(range(len(first), len(ids)))
    return pa.table(
        {
            "id": [ids[i] for i in order],
            "source": [sources[i] for i in order],
            "messages": [messages[i] for i in order],
            "text": [texts[i] for i in order],
            "epoch": [epochs[i] for i in order],
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
    epochs: int = 1,
    count_tokens: CountTokens | None = None,
) -> tuple[pa.Table, dict[str, Any]]:
    """Mix every domain example with TG rows drawn for each epoch to reach ``tg_ratio``.

    Args:
        domain: validated domain dialogues.
        tg: TG rows (``dialogue_id``, ``messages``, ``text``) with the held-out slice already removed; None when
            ``tg_ratio`` is 0.
        tg_ratio: TG share of each epoch, 0 <= r < 1.
        by: count the ratio in ``examples`` or ``tokens``.
        seed: draw and shuffle seed.
        epochs: epochs the mix is trained for; each draws its own TG rows.
        count_tokens: ``(messages, text) -> tokens``; required for ``by="tokens"``, and used for the token counts
            of the stats when given.

    Returns:
        ``(table, stats)``: the mix (:data:`MIX_SCHEMA`) and JSON-ready statistics. ``domain_*`` count one pass over
        the domain data; ``tg_*`` count the TG rows of all epochs, and the shares are those of the whole training.

    Raises:
        ValueError: bad ratio or epochs, no domain examples, or no TG rows while ``tg_ratio > 0``.
    """
    if not 0 <= tg_ratio < 1:
        raise ValueError(f"tg_ratio={tg_ratio}: must be in [0, 1)")
    if epochs < 1:
        raise ValueError(f"epochs={epochs}: must be at least 1")
    if not domain:
        raise ValueError("no domain examples to mix")
    if by == "tokens" and count_tokens is None:
        raise ValueError("mixing by tokens needs count_tokens")
    rng = np.random.default_rng(seed)
    dom_tokens = [count_tokens(m, None) for m in domain] if count_tokens else []
    tg_msgs, tg_text = ([], []) if tg is None else (tg.column("messages").to_pylist(), tg.column("text").to_pylist())
    cache: dict[int, int] = {}

    def tokens_of(i: int) -> int:
        if i not in cache:
            cache[i] = count_tokens(tg_msgs[i] or None, tg_text[i])
        return cache[i]

    picks: list[list[int]] = []
    if tg_ratio > 0:
        if not tg_msgs:
            raise ValueError("tg_ratio > 0 but the TG corpus has no rows left after removing the held-out slice")
        share = tg_ratio / (1 - tg_ratio)
        target = round(len(domain) * share)
        stream: Iterator[int] = _permutations(len(tg_msgs), rng)
        for e in range(epochs):
            need = ((lambda count, _i: count < target) if by == "examples"
                    else _token_need(tokens_of, sum(dom_tokens) * share))
            epoch_picks, stream = _draw(stream, need)
            picks.append(epoch_picks)
            if e == 0:  # shuffled before later epochs draw, so epoch 0's mix is the same whatever ``epochs`` is
                first = rng.permutation(len(domain) + len(epoch_picks))
    else:
        first = rng.permutation(len(domain))

    table = _mixed_table(domain, tg, picks, tg_msgs=tg_msgs, tg_text=tg_text, first=first)
    stats = _stats(picks, n_domain=len(domain), n_avail=len(tg_msgs), epochs=epochs)
    stats = {"tg_ratio": tg_ratio, "by": by, "seed": seed, "epochs": epochs, "rows": table.num_rows, **stats}
    if count_tokens:
        d, t = sum(dom_tokens), sum(tokens_of(i) for p in picks for i in p)
        stats.update(domain_tokens=d, tg_tokens=t, tg_share_tokens=t / (d * epochs + t) if d + t else 0.0)
    return table, stats


def _stats(picks: list[list[int]], *, n_domain: int, n_avail: int, epochs: int) -> dict[str, Any]:
    """Counts of the draw: TG rows per epoch and over the training, distinct rows, repeats, the largest use count."""
    flat = [i for p in picks for i in p]
    uses = np.bincount(flat) if flat else np.zeros(1, dtype=int)
    unique = int((uses > 0).sum())
    return {
        "domain_examples": n_domain,
        "tg_examples": len(flat),
        "tg_examples_per_epoch": [len(p) for p in picks],
        "tg_available": n_avail,
        "tg_unique": unique,
        "tg_repeated": len(flat) > unique,
        "tg_repeats": len(flat) - unique,
        "tg_max_uses": int(uses.max()),
        "tg_share_examples": len(flat) / (n_domain * epochs + len(flat)),
    }


def write_mix(table: pa.Table, stats: dict[str, Any], out_dir: Path, *, shard_rows: int = 50_000) -> Path:
    """Write the mix as ``out_dir/part-*.parquet`` plus ``out_dir/manifest.json``; both appear atomically.

    Returns:
        ``out_dir``.
    """
    write_table(table.cast(MIX_SCHEMA), out_dir, shard_rows=shard_rows)
    atomic_write_text(out_dir / "manifest.json", json.dumps(stats, indent=2) + "\n")
    return out_dir

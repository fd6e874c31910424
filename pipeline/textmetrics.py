"""The metrics behind :mod:`pipeline.quality`, as pure functions of texts, embeddings and node tables: distinct-n,
self-BLEU, complete-sentence rate, mean pairwise cosine, cluster entropy, duplicate rates, coverage of reference
questions, length and per-level statistics. numpy, pyarrow, sacrebleu and scikit-learn only.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = [
    "COVERAGE_THRESHOLD",
    "Embed",
    "cluster_entropy",
    "complete_sentence_rate",
    "coverage",
    "distinct_n",
    "duplicate_rates",
    "length_stats",
    "level_stats",
    "mean_pairwise_cosine",
    "sample_texts",
    "self_bleu",
]

Embed = Callable[[list[str]], np.ndarray]
Texts = Sequence[str] | pa.Array | pa.ChunkedArray  # big corpora stay in Arrow: no Python string per text

COVERAGE_THRESHOLD = 0.5  # all-MiniLM-L6-v2: same-topic questions score ~0.5-0.7, unrelated ones < 0.25
_CURVE = [round(0.3 + 0.05 * i, 2) for i in range(15)]  # 0.30 ... 1.00
_TOKEN = re.compile(r"\w+|[^\w\s]")
_COMPLETE = r"(?:[.!?…。！？][\"'”’)\]*_]*|```)$"  # RE2 (pyarrow) syntax


# ----------------------------------------------------------------------------- text metrics (pure)


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def distinct_n(texts: Iterable[str], n: int) -> float | None:
    """Unique n-grams / all n-grams over ``texts`` (None when no text has n tokens).

    n-grams are counted by their 64-bit hash: a set of ints, not of token tuples, bounds memory on big samples.
    """
    seen: set[int] = set()
    total = 0
    for t in texts:
        toks = _tokens(t)
        grams = [hash(tuple(toks[i : i + n])) for i in range(len(toks) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else None


def self_bleu(texts: Texts, *, sample: int = 200, seed: int = 0) -> tuple[float | None, int]:
    """Mean sentence BLEU (0-100) of each of up to ``sample`` texts against all the other sampled texts.

    Returns:
        (self-BLEU, texts used); None when fewer than two texts.
    """
    from sacrebleu.metrics import BLEU

    texts = sample_texts(texts, sample, seed)
    if len(texts) < 2:
        return None, len(texts)
    bleu = BLEU(effective_order=True)
    scores = [bleu.sentence_score(t, texts[:i] + texts[i + 1 :]).score for i, t in enumerate(texts)]
    return float(np.mean(scores)), len(texts)


def _arrow(texts: Texts) -> pa.ChunkedArray | pa.Array:
    return texts if isinstance(texts, (pa.Array, pa.ChunkedArray)) else pa.array(list(texts), pa.string())


def complete_sentence_rate(texts: Texts) -> float | None:
    """Share of ``texts`` that end in sentence-final punctuation (closing quotes and brackets allowed) or ```."""
    col = _arrow(texts)
    if len(col) == 0:
        return None
    ends = pc.match_substring_regex(pc.utf8_rtrim_whitespace(col), _COMPLETE)
    return pc.sum(ends).as_py() / len(col)


# ----------------------------------------------------------------------------- embedding metrics (pure numpy)


def mean_pairwise_cosine(emb: np.ndarray) -> float | None:
    """Mean cosine over all distinct pairs of L2-normalised rows (n, d); None for fewer than two rows.

    Uses sum_{i != j} e_i . e_j = |sum e|^2 - sum |e_i|^2, so it is O(n d) and exact.
    """
    n = len(emb)
    if n < 2:
        return None
    emb = np.asarray(emb, dtype=np.float64)
    total = emb.sum(axis=0)
    return float((total @ total - (emb * emb).sum()) / (n * (n - 1)))


def cluster_entropy(emb: np.ndarray, *, clusters: int = 16, seed: int = 0) -> tuple[float | None, list[int]]:
    """Normalised entropy of the k-means cluster histogram of ``emb`` (n, d), k = min(``clusters``, n).

    Returns:
        (entropy / log k in [0, 1], cluster sizes in descending order); (None, []) for fewer than two rows.
    """
    import warnings

    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    n = len(emb)
    k = min(clusters, n)
    if k < 2:
        return None, []
    with warnings.catch_warnings():  # identical rows give fewer distinct clusters than k: that is the answer
        warnings.simplefilter("ignore", ConvergenceWarning)
        labels = KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(np.asarray(emb, np.float64))
    sizes = np.bincount(labels, minlength=k)
    p = sizes[sizes > 0] / n
    return float(-(p * np.log(p)).sum() / math.log(k)), sorted(sizes.tolist(), reverse=True)


def _nearest(a: np.ndarray, b: np.ndarray, *, exclude_self: bool = False, block: int = 2048) -> np.ndarray:
    """For each row of ``a``, the highest cosine to a row of ``b`` (rows L2-normalised); blocks bound memory."""
    out = np.empty(len(a), dtype=np.float32)
    for s in range(0, len(a), block):
        sims = a[s : s + block] @ b.T
        if exclude_self:
            idx = np.arange(s, min(s + block, len(a)))
            sims[idx - s, idx] = -np.inf
        out[s : s + block] = sims.max(axis=1)
    return out


def duplicate_rates(texts: Texts, emb: np.ndarray | None, *, near_threshold: float = 0.9) -> dict:
    """Exact (case- and whitespace-folded text) and near (cosine >= ``near_threshold`` to another row of ``emb``)
    duplicate shares."""
    col = _arrow(texts)
    n = len(col)
    folded = pc.utf8_lower(pc.utf8_trim_whitespace(pc.replace_substring_regex(col, r"\s+", " ")))
    exact = 1 - pc.count_distinct(folded).as_py() / n if n else None
    near = None
    if emb is not None and len(emb) >= 2:
        near = float((_nearest(emb, emb, exclude_self=True) >= near_threshold).mean())
    return {"exact_duplicate_rate": exact, "near_duplicate_rate": near, "near_threshold": near_threshold}


def coverage(
    reference: dict[str, np.ndarray], corpus: np.ndarray, *, threshold: float = COVERAGE_THRESHOLD
) -> dict[str, Any] | None:
    """Share of reference questions whose nearest corpus question has cosine >= ``threshold``.

    Args:
        reference: source name -> L2-normalised embeddings (m, d) of its questions.
        corpus: L2-normalised embeddings (n, d) of the corpus questions.
        threshold: cosine at or above which a reference question counts as covered.

    Returns:
        ``{"threshold", "value", "mean_nearest", "n", "curve": [[t, share], ...], "by_source": {name: {...}}}``;
        None without reference questions or corpus questions.
    """
    ref = [(name, e) for name, e in reference.items() if len(e)]
    if not ref or len(corpus) == 0:
        return None
    nearest = {name: _nearest(np.asarray(e, np.float32), np.asarray(corpus, np.float32)) for name, e in ref}
    every = np.concatenate(list(nearest.values()))

    def share(sims: np.ndarray, t: float) -> float:  # float32 cosine of a text with itself can be 0.99999994
        return float((sims >= t - 1e-6).mean())

    return {
        "threshold": threshold,
        "value": share(every, threshold),
        "mean_nearest": float(every.mean()),
        "n": len(every),
        "curve": [[t, share(every, t)] for t in _CURVE],
        "by_source": {name: {"n": len(s), "value": share(s, threshold), "mean_nearest": float(s.mean())}
                      for name, s in nearest.items()},
    }


# ----------------------------------------------------------------------------- node-table metrics (pure)


def _summary(values: Sequence[float], bins: int = 20) -> dict[str, Any] | None:
    if len(values) == 0:
        return None
    v = np.asarray(values, dtype=np.float64)
    counts, edges = np.histogram(v, bins=bins)
    return {"n": len(v), "mean": float(v.mean()), "p10": float(np.percentile(v, 10)),
            "p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90)), "max": float(v.max()),
            "histogram": {"edges": [float(x) for x in edges], "counts": counts.tolist()}}


def length_stats(questions: Sequence[int], answers: Sequence[int], dialogues: Sequence[int]) -> dict:
    """Generated-token length summaries (mean, p10/p50/p90, max, 20-bin histogram) per kind; None when empty."""
    return {"question": _summary(questions), "answer": _summary(answers), "dialogue": _summary(dialogues)}


def level_stats(nodes: pa.Table) -> dict[str, dict]:
    """Per level: generated, kept, truncated / trimmed / drop rates and drop reasons, from a node table
    (columns ``level``, ``status``, ``finish_reason``, ``drop_reason``)."""
    out: dict[str, dict] = {}
    cols = nodes.select(["level", "status", "finish_reason", "drop_reason"])
    for level in sorted(set(cols.column("level").to_pylist())):
        rows = cols.filter(pc.equal(cols["level"], level))
        kept = pc.equal(rows["status"], "kept")
        cut = pc.equal(rows["finish_reason"], "length")
        reasons = Counter(rows.filter(pc.invert(kept)).column("drop_reason").to_pylist())
        n = rows.num_rows
        out[str(level)] = {
            "generated": n,
            "kept": n - sum(reasons.values()),
            "truncated_rate": pc.sum(cut).as_py() / n,  # hit the level's token limit
            "trimmed_rate": pc.sum(pc.and_(cut, kept)).as_py() / n,  # ... and kept (cut back, or kept as is)
            "drop_rate": sum(reasons.values()) / n,
            "dropped": dict(sorted(reasons.items())),
        }
    return out


def sample_texts(texts: Texts, k: int, seed: int) -> list[str]:
    """At most ``k`` of ``texts`` (a seeded sample, in corpus order) as Python strings."""
    if len(texts) <= k:
        return texts.to_pylist() if isinstance(texts, (pa.Array, pa.ChunkedArray)) else list(texts)
    idx = np.sort(np.random.default_rng(seed).choice(len(texts), size=k, replace=False))
    if isinstance(texts, (pa.Array, pa.ChunkedArray)):
        return texts.take(pa.array(idx)).to_pylist()
    return [texts[i] for i in idx]

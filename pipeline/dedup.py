"""Semantic deduplication of questions before a level is expanded.

Input: L2-normalised sentence embeddings (n, d) of a level's candidate questions in a fixed order, and those of every
question kept at earlier levels. Output: a keep mask. A question is a near-duplicate when its cosine similarity to an
earlier *kept* question (earlier level, or earlier in this level) is at least ``threshold``.

How it scales:
- ``greedy`` is exact. Similarities are computed in blocks of ``block_size`` rows: one (block x kept) matrix product
  against everything already kept, then a (block x block) product for the block itself, resolved in order.
  Flops are O(n * k * d) for k kept questions, memory O(block_size * k) floats; 100 k questions of 384-d take a few
  seconds on one core.
- ``cluster`` (SemDeDup-style) first buckets all vectors by their nearest k-means centroid (k = sqrt(n) by default,
  fitted on at most ``sample_rows`` of them) and runs the greedy pass inside each bucket only, so cost falls to about
  O(n * (n / k) * d). Near-duplicates that straddle two buckets can survive; that is the accepted trade-off for
  levels of millions. :mod:`pipeline.levels` runs the same steps distributed: centroids in one task, buckets and the
  per-bucket passes in Ray Data workers.

Pure numpy (+ scikit-learn's k-means for ``cluster``); no Ray or torch.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SAMPLE_ROWS", "dedup_mask", "fit_centroids", "nearest_centroid"]

SAMPLE_ROWS = 65_536  # at most this many embeddings fit the k-means centroids of the cluster method


def _greedy(new: np.ndarray, prev: np.ndarray, threshold: float, block_size: int) -> np.ndarray:
    keep = np.ones(len(new), dtype=bool)
    kept_blocks = [prev] if len(prev) else []
    for start in range(0, len(new), block_size):
        block = new[start : start + block_size]
        dup = np.zeros(len(block), dtype=bool)
        for kb in kept_blocks:
            dup |= (block @ kb.T).max(axis=1) >= threshold
        sims = block @ block.T
        for i in range(len(block)):
            if dup[i]:
                continue
            # i is kept: every later row of the block that is too close to it is a duplicate.
            dup[i + 1 :] |= sims[i, i + 1 :] >= threshold
        keep[start : start + len(block)] = ~dup
        if (~dup).any():
            kept_blocks.append(block[~dup])
    return keep


def dedup_mask(
    new: np.ndarray,
    prev: np.ndarray | None = None,
    *,
    threshold: float,
    method: str = "greedy",
    block_size: int = 4096,
    clusters: int = 0,
    seed: int = 0,
    sample_rows: int = SAMPLE_ROWS,
) -> np.ndarray:
    """Keep mask for ``new`` (n, d) given earlier kept vectors ``prev`` (m, d); rows must be L2-normalised.

    Args:
        new: candidate embeddings, in the order in which ties are resolved (first one wins).
        prev: embeddings of questions kept at earlier levels (None or empty: none).
        threshold: cosine similarity at or above which a row is a duplicate.
        method: 'greedy' (exact) or 'cluster' (k-means buckets first).
        block_size: rows per block of the greedy pass.
        clusters: k for 'cluster'; 0 picks sqrt(n + m).
        seed: k-means seed.
        sample_rows: at most this many rows (every j-th) fit the centroids.

    Returns:
        Boolean array of length n: True = keep.
    """
    new = np.asarray(new, dtype=np.float32)
    dim = new.shape[1] if new.ndim == 2 else 0
    prev = np.zeros((0, dim), np.float32) if prev is None else np.asarray(prev, np.float32)
    if len(new) == 0:
        return np.zeros(0, dtype=bool)
    if method == "greedy":
        return _greedy(new, prev, threshold, block_size)
    if method != "cluster":
        raise ValueError(f"dedup method {method!r}: expected 'greedy' or 'cluster'")

    both = np.concatenate([prev, new]) if len(prev) else new
    k = min(clusters or max(1, int(np.sqrt(len(both)))), len(both))
    labels = nearest_centroid(both, fit_centroids(both[:: max(1, -(-len(both) // sample_rows))], k, seed=seed))
    prev_labels, new_labels = labels[: len(prev)], labels[len(prev) :]
    keep = np.ones(len(new), dtype=bool)
    for c in np.unique(new_labels):
        idx = np.flatnonzero(new_labels == c)
        keep[idx] = _greedy(new[idx], prev[prev_labels == c], threshold, block_size)
    return keep


def fit_centroids(sample: np.ndarray, k: int, *, seed: int = 0) -> np.ndarray:
    """k L2-normalised k-means centroids (k, d) of ``sample`` (at most ``len(sample)``)."""
    from sklearn.cluster import MiniBatchKMeans

    sample = np.asarray(sample, np.float32)
    k = max(1, min(k, len(sample)))
    centers = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=1, batch_size=4096).fit(sample).cluster_centers_
    return (centers / np.maximum(np.linalg.norm(centers, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def nearest_centroid(vectors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the most similar centroid (cosine) for each L2-normalised row of ``vectors``."""
    return (np.asarray(vectors, np.float32) @ centroids.T).argmax(axis=1)

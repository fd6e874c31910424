"""Semantic dedup decisions on hand-made unit vectors (the embedder itself is covered by integration tests)."""

import numpy as np
import pytest

from pipeline.dedup import dedup_mask


def _unit(rows):
    a = np.asarray(rows, dtype=np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_greedy_drops_near_duplicates_in_order():
    new = _unit([[1, 0, 0], [0.99, 0.05, 0], [0, 1, 0], [0, 0.98, 0.1], [0, 0, 1]])
    assert dedup_mask(new, threshold=0.95).tolist() == [True, False, True, False, True]


def test_against_earlier_levels():
    prev = _unit([[1, 0, 0]])
    new = _unit([[0.99, 0.01, 0], [0, 1, 0]])
    assert dedup_mask(new, prev, threshold=0.95).tolist() == [False, True]


def test_blocks_give_the_same_answer_as_one_block():
    rng = np.random.default_rng(0)
    base = _unit(rng.normal(size=(50, 16)))
    noisy = _unit(np.repeat(base, 4, axis=0) + rng.normal(scale=0.05, size=(200, 16)))
    one = dedup_mask(noisy, threshold=0.9, block_size=1000)
    small = dedup_mask(noisy, threshold=0.9, block_size=7)
    assert (one == small).all()
    assert one.sum() == 50  # one survivor per original vector


def test_cluster_method_keeps_distinct_and_drops_copies():
    rng = np.random.default_rng(1)
    base = _unit(rng.normal(size=(40, 32)))
    new = np.concatenate([base, base + 1e-4])
    keep = dedup_mask(_unit(new), threshold=0.95, method="cluster", clusters=4)
    assert keep[:40].all() and not keep[40:].any()


def test_unknown_method():
    with pytest.raises(ValueError, match="dedup method"):
        dedup_mask(_unit([[1, 0]]), threshold=0.9, method="magic")

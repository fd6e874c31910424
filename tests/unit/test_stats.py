"""Paired statistics on hand-made items with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.stats import align, mcnemar_exact, paired_diff, prevented_share


def test_paired_diff_known_mean_and_standard_error():
    out = paired_diff([1, 0, 1, 1], [1, 1, 0, 0], iters=500, seed=0)
    # differences 0, 1, -1, -1: mean -0.25, sample variance 2.75 / 3
    assert out["delta"] == pytest.approx(-0.25)
    assert out["se"] == pytest.approx(math.sqrt(2.75 / 3 / 4))
    assert out["n"] == 4
    lo, hi = out["ci95"]
    assert -1.0 <= lo <= -0.25 <= hi <= 0.5


def test_paired_bootstrap_is_seeded_and_exact_where_the_answer_is_known():
    # every item moves by exactly 0.1: no resample can give anything else
    assert paired_diff([0.2, 0.5, 0.9], [0.3, 0.6, 1.0], seed=7)["ci95"] == pytest.approx([0.1, 0.1])
    # two items with differences 0 and 1: resample means are 0, 0.5, 1 (p = 1/4, 1/2, 1/4), so the 2.5 % and
    # 97.5 % points are 0 and 1
    assert paired_diff([0, 0], [0, 1], iters=4000, seed=0)["ci95"] == [0.0, 1.0]
    rng = np.random.default_rng(1)
    a = rng.normal(size=400)
    b = a + 0.1 + rng.normal(scale=0.5, size=400)
    first, again = paired_diff(a, b, seed=3), paired_diff(a, b, seed=3)
    assert first == again
    # the percentile interval of a mean of 400 items is close to +- 1.96 standard errors
    lo, hi = first["ci95"]
    assert (hi - lo) / 2 == pytest.approx(1.96 * first["se"], rel=0.1)
    assert paired_diff(a, b, seed=4)["ci95"] != first["ci95"]


def test_paired_diff_rejects_misaligned_input():
    with pytest.raises(ValueError, match="one length"):
        paired_diff([1, 0], [1])


def test_mcnemar_exact_known_values():
    a = [1] * 9 + [0] + [1] * 20
    b = [0] * 9 + [1] + [1] * 20
    # 9 right->wrong, 1 wrong->right: p = 2 * (C(10,0) + C(10,1)) / 2^10
    assert mcnemar_exact(a, b) == pytest.approx(2 * 11 / 1024)
    assert mcnemar_exact([1] * 5, [0] * 5) == pytest.approx(2 / 32)
    assert mcnemar_exact([1, 0] * 5, [0, 1] * 5) == 1.0  # 5 and 5 discordant: capped at 1
    assert mcnemar_exact([1, 0, 1], [1, 0, 1]) == 1.0  # no discordant item
    with pytest.raises(ValueError, match="0 or 1"):
        mcnemar_exact([0.5], [1])


def test_prevented_share_point_values_and_directions():
    base = [1] * 10
    control = [1] * 6 + [0] * 4  # drops 0.4
    variant = [1] * 8 + [0] * 2  # drops 0.2
    out = prevented_share([(base, control, variant)], iters=1000, seed=0)
    assert out["share"] == pytest.approx(0.5)
    assert out["control_drop"] == pytest.approx(0.4) and out["variant_drop"] == pytest.approx(0.2)
    assert out["n"] == 10 and out["ci95"][0] <= 0.5 <= out["ci95"][1]
    # pooled over tasks: drops 0.4 + 0.2 (control) and 0.2 + 0.2 (variant) -> 1 - 0.4 / 0.6
    pooled = prevented_share([(base, control, variant), ([1] * 5, [1] * 4 + [0], [1] * 4 + [0])], seed=0)
    assert pooled["share"] == pytest.approx(1 / 3)
    # lower is better (an NLL): the control rises by 2, the variant by 0.5 -> 75 % prevented
    nll = prevented_share([([1.0, 2.0], [3.0, 4.0], [1.5, 2.5])], higher_is_better=False, seed=0)
    assert nll["share"] == pytest.approx(0.75) and nll["ci95"] == pytest.approx([0.75, 0.75])


def test_prevented_share_resamples_items_jointly():
    # the variant loses exactly half of what the control loses on every item: every joint resample gives 0.5
    rng = np.random.default_rng(0)
    base = rng.uniform(-2, -1, size=50)
    control = base - rng.uniform(0.1, 1.0, size=50)
    variant = base + (control - base) / 2
    out = prevented_share([(base, control, variant)], iters=500, seed=1)
    assert out["share"] == pytest.approx(0.5) and out["ci95"] == pytest.approx([0.5, 0.5])
    assert out["undefined_fraction"] == 0.0


def test_prevented_share_when_the_control_did_not_drop():
    out = prevented_share([([1, 1, 0], [1, 1, 0], [1, 0, 0])], iters=200, seed=0)
    assert out["share"] is None and out["control_drop"] == 0.0
    assert out["undefined_fraction"] == 1.0 and out["ci95"] is None


def test_align_keeps_shared_items_in_reference_order():
    ids, a, b = align([3, 1, 2], [0.3, 0.1, 0.2], [2, 3, 9], [2.0, 3.0, 9.0])
    assert ids == [3, 2] and a.tolist() == [0.3, 0.2] and b.tolist() == [3.0, 2.0]

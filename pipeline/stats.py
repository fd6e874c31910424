"""Paired statistics for models scored on the same items (pure numpy).

Every model answers the same items, so a difference between two models is taken item by item: its standard error
is that of the per-item differences, which removes the item-to-item variance both models share. Provided here:

- :func:`paired_diff`: mean difference, paired standard error and a seeded paired bootstrap 95 % interval;
- :func:`mcnemar_exact`: the exact (binomial) McNemar p-value for paired 0/1 outcomes such as accuracy;
- :func:`prevented_share`: the share of a control arm's drop that a variant avoided,
  ``1 - drop(variant) / drop(control)`` with ``drop(x) = mean(base - x)`` (sign-flipped for lower-is-better
  metrics), pooled over one or more tasks, with a bootstrap interval that resamples each task's items jointly
  for all three models.

Bootstrap intervals are percentile intervals over ``iters`` resamples drawn from ``numpy.random.default_rng(seed)``,
so the same inputs and seed give the same interval.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["align", "mcnemar_exact", "mean_stderr", "paired_diff", "prevented_share"]


def mean_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean of ``values`` (sample std / sqrt(n), as lm-eval reports it).

    Returns:
        ``(mean, stderr)``: stderr is 0 for one value; ``(nan, None)`` for none.
    """
    n = len(values)
    if not n:
        return math.nan, None
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def align(ids_a: Sequence, values_a: Sequence[float], ids_b: Sequence,
          values_b: Sequence[float]) -> tuple[list, np.ndarray, np.ndarray]:
    """The items both models scored, in ``ids_a`` order, as two aligned float arrays.

    Args:
        ids_a, values_a: item ids and one score per item of model A.
        ids_b, values_b: the same for model B (any order; items B lacks are dropped).

    Returns:
        ``(ids, a, b)``.
    """
    lookup = dict(zip(ids_b, values_b, strict=True))
    pairs = [(i, va, lookup[i]) for i, va in zip(ids_a, values_a, strict=True) if i in lookup]
    ids = [i for i, _, _ in pairs]
    return ids, np.array([p[1] for p in pairs], dtype=float), np.array([p[2] for p in pairs], dtype=float)


def _percentile_ci(samples: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def paired_diff(a: Sequence[float], b: Sequence[float], *, iters: int = 2000, seed: int = 0,
                level: float = 0.95) -> dict[str, float | int | list[float]]:
    """Mean of ``b - a`` over aligned items with its paired standard error and bootstrap interval.

    Args:
        a: reference scores, one per item.
        b: the compared model's scores on the same items, same order.
        iters: bootstrap resamples.
        seed: bootstrap seed.
        level: interval coverage (0.95 = 95 %).

    Returns:
        ``{"delta", "se", "ci95": [lo, hi], "n"}``; ``se`` is ``std(b - a, ddof=1) / sqrt(n)`` (0 for one item).

    Raises:
        ValueError: the arrays differ in length or are empty.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired_diff: need two non-empty 1-d arrays of one length, got {a.shape} and {b.shape}")
    d = b - a
    n = d.size
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, n, size=(iters, n))].mean(axis=1)
    return {"delta": float(d.mean()), "se": se, "ci95": list(_percentile_ci(means, level)), "n": int(n)}


def mcnemar_exact(a: Sequence[float], b: Sequence[float]) -> float:
    """Exact two-sided McNemar p-value for paired binary outcomes (1 = correct).

    Only discordant items count: ``n01`` (a wrong, b right) and ``n10`` (a right, b wrong). Under "no difference"
    ``n01 ~ Binomial(n01 + n10, 1/2)``; the p-value is ``min(1, 2 * P(X <= min(n01, n10)))``, and 1 with no
    discordant item.

    Raises:
        ValueError: lengths differ or a value is not 0 or 1.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"mcnemar_exact: lengths differ ({a.size} vs {b.size})")
    if not np.isin(a, (0, 1)).all() or not np.isin(b, (0, 1)).all():
        raise ValueError("mcnemar_exact: outcomes must be 0 or 1")
    n01, n10 = int(((a == 0) & (b == 1)).sum()), int(((a == 1) & (b == 0)).sum())
    n = n01 + n10
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(n01, n10) + 1)) / 2**n
    return min(1.0, 2 * tail)


def _share(drops_c: float, drops_v: float) -> float:
    return 1.0 - drops_v / drops_c if drops_c > 0 else float("nan")


def prevented_share(
    tasks: Sequence[tuple[Sequence[float], Sequence[float], Sequence[float]]], *, higher_is_better: bool = True,
    iters: int = 2000, seed: int = 0, level: float = 0.95,
) -> dict[str, float | int | list[float] | None]:
    """Share of the control arm's drop that the variant prevented, pooled over tasks.

    ``drop(x) = sum over tasks of mean(base - x)`` (``x - base`` when lower is better); the share is
    ``1 - drop(variant) / drop(control)``: 1 = the variant lost nothing, 0 = it lost as much as the control,
    negative = it lost more. The interval resamples every task's items (one index draw for base, control and
    variant together) ``iters`` times; resamples in which the control did not drop give no share and are left out
    of the interval (their fraction is ``undefined_fraction``).

    Args:
        tasks: per task, aligned per-item scores ``(base, control, variant)``.
        higher_is_better: direction of the metric.
        iters: bootstrap resamples.
        seed: bootstrap seed.
        level: interval coverage.

    Returns:
        ``{"share", "ci95", "control_drop", "control_drop_ci95", "variant_drop", "n", "undefined_fraction"}``;
        ``share`` is None when the control did not drop at all, ``ci95`` is None when no resample defines it.

    Raises:
        ValueError: no tasks, or a task's arrays differ in length or are empty.
    """
    if not tasks:
        raise ValueError("prevented_share: no tasks")
    sign = 1.0 if higher_is_better else -1.0
    rng = np.random.default_rng(seed)
    point_c = point_v = 0.0
    boot_c, boot_v = np.zeros(iters), np.zeros(iters)
    n_total = 0
    for base, control, variant in tasks:
        base, control, variant = (np.asarray(x, dtype=float) for x in (base, control, variant))
        if not (base.shape == control.shape == variant.shape) or base.ndim != 1 or base.size == 0:
            raise ValueError("prevented_share: each task needs three non-empty aligned 1-d arrays")
        dc, dv = sign * (base - control), sign * (base - variant)
        point_c, point_v = point_c + dc.mean(), point_v + dv.mean()
        idx = rng.integers(0, base.size, size=(iters, base.size))
        boot_c += dc[idx].mean(axis=1)
        boot_v += dv[idx].mean(axis=1)
        n_total += base.size
    defined = boot_c > 0
    shares = 1.0 - boot_v[defined] / boot_c[defined]
    share = _share(point_c, point_v)
    return {
        "share": None if math.isnan(share) else float(share),
        "ci95": list(_percentile_ci(shares, level)) if shares.size else None,
        "control_drop": float(point_c),
        "control_drop_ci95": list(_percentile_ci(boot_c, level)),
        "variant_drop": float(point_v),
        "n": n_total,
        "undefined_fraction": float(1 - defined.mean()),
    }

"""Rank agreement between an IRM and the true word utilities."""

from __future__ import annotations

import numpy as np


def kendall_tau(a, b) -> float:
    from scipy.stats import kendalltau

    return float(kendalltau(np.asarray(a), np.asarray(b)).statistic)


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(np.asarray(a), np.asarray(b)).statistic)


def bootstrap_tau_ci(
    irm: dict[int, float],
    true: dict[int, float],
    other: dict[int, float] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    statistic: str = "kendall",
) -> tuple[float, float]:
    """Percentile bootstrap CI over held-out words of Kendall tau(irm, true), or, with ``other``,
    of tau(irm, true) - tau(other, true) on the same resampled words (a paired comparison).
    ``statistic="spearman"`` does the same for Spearman's rho."""
    from scipy.stats import kendalltau, spearmanr

    if statistic not in ("kendall", "spearman"):
        raise ValueError(f"statistic {statistic!r}; choose kendall or spearman")
    corr = kendalltau if statistic == "kendall" else spearmanr

    words = sorted(irm)
    a = np.array([irm[w] for w in words])
    t = np.array([true[w] for w in words])
    b = np.array([other[w] for w in words]) if other is not None else None
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(words), len(words))
        s = corr(a[idx], t[idx]).statistic
        if b is not None:
            s -= corr(b[idx], t[idx]).statistic
        stats.append(s)
    lo, hi = np.nanpercentile(stats, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)

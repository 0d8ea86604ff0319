"""Rank agreement between an IRM and the true word utilities."""

from __future__ import annotations

import numpy as np


def kendall_tau(a, b) -> float:
    from scipy.stats import kendalltau

    return float(kendalltau(np.asarray(a), np.asarray(b)).statistic)


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(np.asarray(a), np.asarray(b)).statistic)

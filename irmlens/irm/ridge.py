"""Ridge regression in closed form, with grouped cross-validation (pure functions on tensors).

Written here rather than taken from scikit-learn (not a dependency): it is a few lines in torch,
works on float64 for stability, and gives grouped folds so that cross-validation never scores a
word it was fitted on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RidgeModel:
    coef: torch.Tensor  # [d] in original feature units
    intercept: float
    alpha: float

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return x.double() @ self.coef + self.intercept


def fit_ridge(x: torch.Tensor, y: torch.Tensor, alpha: float) -> RidgeModel:
    """Minimise ||y - x w - b||^2 + alpha ||w||^2 over standardised features (b unpenalised)."""
    x = x.double()
    y = y.double()
    mu = x.mean(0)
    sd = x.std(0, unbiased=False).clamp_min(1e-8)
    z = (x - mu) / sd
    ym = y.mean()
    gram = z.T @ z
    gram.diagonal().add_(alpha)
    w_z = torch.linalg.solve(gram, z.T @ (y - ym))
    coef = w_z / sd
    return RidgeModel(coef=coef, intercept=float(ym - mu @ coef), alpha=alpha)


def r2_score(y: torch.Tensor, pred: torch.Tensor) -> float:
    y = y.double()
    ss_res = float(((y - pred.double()) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")


def group_folds(groups: torch.Tensor, n_folds: int, seed: int = 0) -> list[torch.Tensor]:
    """Boolean test masks; every group (e.g. a word) lands in exactly one fold."""
    uniq = torch.unique(groups)
    perm = uniq[torch.randperm(len(uniq), generator=torch.Generator().manual_seed(seed))]
    fold_of = {int(g): i % n_folds for i, g in enumerate(perm)}
    fold = torch.tensor([fold_of[int(g)] for g in groups])
    return [fold == k for k in range(n_folds)]


def ridge_cv(
    x: torch.Tensor,
    y: torch.Tensor,
    groups: torch.Tensor,
    alphas: list[float],
    n_folds: int = 5,
    seed: int = 0,
) -> tuple[float, float, dict[float, float]]:
    """Pick alpha by grouped K-fold CV. Returns (best alpha, its pooled out-of-fold R^2, all scores)."""
    folds = group_folds(groups, n_folds, seed)
    scores = {}
    for alpha in alphas:
        pred = torch.empty(len(y), dtype=torch.float64)
        for test in folds:
            model = fit_ridge(x[~test], y[~test], alpha)
            pred[test] = model.predict(x[test])
        scores[alpha] = r2_score(y, pred)
    best = max(scores, key=lambda a: scores[a])
    return best, scores[best], scores

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


@dataclass
class RidgeDesign:
    """A design matrix standardised and eigendecomposed once, solved for any target and alpha.

    The eigendecomposition of ``z^T z`` is the cost of a fit; the target only enters a product.
    The shuffled-target control refits ten permuted targets on the same features, and each fit
    cross-validates on the same folds: one design per fold serves them all (the same operations,
    so the same bits, as fitting each from scratch). A design kept for many targets drops the
    standardised ``z`` (``keep_z=False``: a float64 copy of ``x`` per fold) and rebuilds it from
    ``x`` and the fold's ``rows`` per target; one made for a single fit keeps it."""

    x: torch.Tensor
    rows: torch.Tensor | None
    mu: torch.Tensor
    sd: torch.Tensor
    evals: torch.Tensor
    evecs: torch.Tensor
    z: torch.Tensor | None

    @classmethod
    def of(
        cls, x: torch.Tensor, rows: torch.Tensor | None = None, keep_z: bool = True
    ) -> RidgeDesign:
        """The design of ``x`` (of its ``rows``, a boolean mask, when given)."""
        xd = (x if rows is None else x[rows]).double()
        mu = xd.mean(0)
        sd = xd.std(0, unbiased=False).clamp_min(1e-8)
        z = (xd - mu) / sd
        evals, evecs = torch.linalg.eigh(z.T @ z)
        return cls(x, rows, mu, sd, evals, evecs, z if keep_z else None)

    def path(self, y: torch.Tensor, alphas: list[float]) -> list[RidgeModel]:
        z = self.z
        if z is None:
            z = ((self.x if self.rows is None else self.x[self.rows]).double() - self.mu) / self.sd
        y = y.double()
        ym = y.mean()
        proj = self.evecs.T @ (z.T @ (y - ym))
        models = []
        for alpha in alphas:
            w_z = self.evecs @ (proj / (self.evals.clamp_min(0) + alpha))
            coef = w_z / self.sd
            models.append(RidgeModel(coef=coef, intercept=float(ym - self.mu @ coef), alpha=alpha))
        return models


def fit_ridge_path(x: torch.Tensor, y: torch.Tensor, alphas: list[float]) -> list[RidgeModel]:
    """Ridge for every alpha, sharing one Gram matrix: minimise ||y - x w - b||^2 + alpha ||w||^2
    over standardised features (b unpenalised). One eigendecomposition serves all alphas."""
    return RidgeDesign.of(x).path(y, alphas)


def fit_ridge(x: torch.Tensor, y: torch.Tensor, alpha: float) -> RidgeModel:
    """Minimise ||y - x w - b||^2 + alpha ||w||^2 over standardised features (b unpenalised)."""
    return fit_ridge_path(x, y, [alpha])[0]


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


class RidgeCVDesign:
    """A design's grouped folds and the :class:`RidgeDesign` of every fold's training rows and of
    all rows: :func:`ridge_cv` and the final fit for any number of targets on the same features
    and groups (``ridge_cv(..., design=d)``, then ``d.full.path``). It holds ``n_folds + 1``
    ``d x d`` eigenbases (``ridge_cv`` alone makes one at a time)."""

    def __init__(self, x: torch.Tensor, groups: torch.Tensor, n_folds: int = 5, seed: int = 0):
        self.x, self.n_rows, self.n_folds, self.seed = x, len(groups), n_folds, seed
        self.folds = group_folds(groups, n_folds, seed)
        self.train = [RidgeDesign.of(x, ~test, keep_z=False) for test in self.folds]
        self.full = RidgeDesign.of(x, keep_z=False)


def ridge_cv(
    x: torch.Tensor,
    y: torch.Tensor,
    groups: torch.Tensor,
    alphas: list[float],
    n_folds: int = 5,
    seed: int = 0,
    design: RidgeCVDesign | None = None,
) -> tuple[float, float, dict[float, float]]:
    """Pick alpha by grouped K-fold CV. Returns (best alpha, its pooled out-of-fold R^2, all scores).
    ``design``: the folds' decompositions of this ``x``, ``groups``, ``n_folds`` and ``seed``,
    made once (:class:`RidgeCVDesign`)."""
    if design is None:  # one fold's decomposition at a time (each holds a copy of x)
        folds = group_folds(groups, n_folds, seed)
        trains = (RidgeDesign.of(x, ~test) for test in folds)
    elif design.x is not x or design.n_rows != len(y):
        raise ValueError("ridge_cv: the design was made for another feature matrix")
    elif (design.n_folds, design.seed) != (n_folds, seed):
        raise ValueError(
            f"ridge_cv: the design's folds ({design.n_folds}, seed {design.seed}) are not the "
            f"ones asked for ({n_folds}, seed {seed})"
        )
    else:
        folds, trains = design.folds, design.train
    preds = {alpha: torch.empty(len(y), dtype=torch.float64) for alpha in alphas}
    for test, train in zip(folds, trains, strict=True):
        for model in train.path(y[~test], alphas):
            preds[model.alpha][test] = model.predict(x[test])
    scores = {alpha: r2_score(y, preds[alpha]) for alpha in alphas}
    best = max(scores, key=lambda a: scores[a])
    return best, scores[best], scores


def fit_ridge_sparse(
    x, y: torch.Tensor, alpha: float, tol: float = 1e-8, maxiter: int = 2000
) -> tuple[RidgeModel, int]:
    """The same standardised ridge as ``fit_ridge`` for a large sparse ``x`` (scipy CSR, e.g. SAE
    codes of a million positions x 16k features), by conjugate gradients on the normal equations.

    Centring would destroy sparsity, so it is applied implicitly: with ``z = (x - 1 mu^T) D^-1``,
    ``z^T z v = D^-1 (x^T x D^-1 v - n mu (mu^T D^-1 v))``. Each iteration costs two sparse
    matrix-vector products. Returns (model, iterations).
    """
    import numpy as np
    from scipy.sparse.linalg import LinearOperator, cg

    x = x.astype(np.float64)  # E[x^2] - mu^2 below loses too much in float32
    n, d = x.shape
    yv = y.double().numpy()
    mu = np.asarray(x.mean(axis=0)).ravel()
    sq = np.asarray(x.multiply(x).mean(axis=0)).ravel()
    sd = np.sqrt(np.maximum(sq - mu**2, 0.0))
    sd = np.maximum(sd, 1e-8)
    xt = x.T.tocsr()

    def normal(v):
        u = v / sd
        return (xt @ (x @ u) - n * mu * (mu @ u)) / sd + alpha * v

    rhs = (xt @ (yv - yv.mean()) - mu * (yv - yv.mean()).sum()) / sd
    iterations = 0

    def count(_):
        nonlocal iterations
        iterations += 1

    w_z, info = cg(
        LinearOperator((d, d), matvec=normal, dtype=np.float64),
        rhs,
        rtol=tol,
        maxiter=maxiter,
        callback=count,
    )
    if info > 0:
        raise RuntimeError(f"ridge CG did not converge in {maxiter} iterations (raise alpha)")
    coef = torch.from_numpy(w_z / sd)
    return RidgeModel(
        coef=coef, intercept=float(yv.mean() - mu @ (w_z / sd)), alpha=alpha
    ), iterations

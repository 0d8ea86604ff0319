import pytest
import torch

from irmlens.irm.ridge import fit_ridge, group_folds, r2_score, ridge_cv


def test_ridge_recovers_planted_linear_map():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 20, generator=g) * torch.linspace(0.1, 5, 20)
    w = torch.randn(20, generator=g)
    y = x @ w + 3.0 + 0.01 * torch.randn(2000, generator=g)
    model = fit_ridge(x, y, alpha=1e-3)
    assert torch.allclose(model.coef.float(), w, atol=1e-2)
    assert abs(model.intercept - 3.0) < 1e-2
    assert r2_score(y, model.predict(x)) > 0.999


def test_grouped_cv_picks_regularisation_and_keeps_groups_together():
    g = torch.Generator().manual_seed(1)
    groups = torch.randint(0, 50, (1000,), generator=g)
    folds = group_folds(groups, 5)
    assert torch.stack(folds).sum(0).eq(1).all()
    for f in folds:
        assert not set(groups[f].tolist()) & set(groups[~f].tolist())
    # pure noise target: heavy regularisation wins and CV R2 is near zero, not spuriously high
    x = torch.randn(1000, 200, generator=g)
    y = torch.randn(1000, generator=g)
    alpha, cv_r2, scores = ridge_cv(x, y, groups, [0.01, 1.0, 1e4])
    assert alpha == 1e4 and cv_r2 < 0.02
    assert scores[0.01] < scores[1e4]


def test_sparse_ridge_matches_dense_closed_form():
    import numpy as np
    import scipy.sparse as sp

    from irmlens.irm.ridge import fit_ridge, fit_ridge_sparse

    rng = np.random.default_rng(0)
    dense = rng.exponential(1.0, (3000, 200)) * (rng.random((3000, 200)) < 0.05)
    w = rng.normal(size=200)
    y = torch.from_numpy(dense @ w + 0.1 * rng.normal(size=3000))
    ref = fit_ridge(torch.from_numpy(dense), y, alpha=3.0)
    got, iters = fit_ridge_sparse(sp.csr_matrix(dense), y, alpha=3.0)
    assert torch.allclose(got.coef, ref.coef, rtol=1e-5, atol=1e-6)
    assert abs(got.intercept - ref.intercept) < 1e-6
    assert 0 < iters < 2000


def test_a_shared_design_gives_the_same_bits_as_fitting_each_target_from_scratch():
    """The shuffled-target control refits ten targets on one design, decomposed once."""
    from irmlens.irm.ridge import RidgeCVDesign

    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 12, generator=g)
    groups = torch.randint(40, (300,), generator=g)
    design = RidgeCVDesign(x, groups, n_folds=5, seed=2)
    alphas = [0.1, 10.0, 1e3]
    for k in range(3):
        y = x[:, k] + 0.5 * torch.randn(300, generator=g)
        alpha, r2, _ = ridge_cv(x, y, groups, alphas, 5, 2)
        ref = fit_ridge(x, y, alpha)
        got_alpha, cv_r2, _ = ridge_cv(x, y, groups, alphas, 5, 2, design)
        model = design.full.path(y, [got_alpha])[0]
        assert (model.alpha, cv_r2) == (alpha, r2) and r2 > 0.3
        assert torch.equal(model.coef, ref.coef) and model.intercept == ref.intercept
    with pytest.raises(ValueError, match="another feature matrix"):
        ridge_cv(x.clone(), y, groups, alphas, 5, 2, design=design)
    with pytest.raises(ValueError, match="not the ones asked for"):
        ridge_cv(x, y, groups, alphas, 4, 2, design=design)

import numpy as np
import pytest

from irmlens.irm import metrics
from irmlens.irm.metrics import bootstrap_tau_ci


def _scipy_bootstrap(a, t, b, n_boot, seed):
    """The loop bootstrap_tau_ci ran before: scipy's kendalltau on every resample."""
    from scipy.stats import kendalltau

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(a), len(a))
        s = kendalltau(a[idx], t[idx]).statistic
        if b is not None:
            s -= kendalltau(b[idx], t[idx]).statistic
        out.append(s)
    return np.array(out)


@pytest.mark.parametrize("n", [3, 40, 217])
def test_resampled_kendall_tau_is_scipys_to_the_bit_with_ties(n):
    rng = np.random.default_rng(n)
    a = rng.normal(size=n)
    t = rng.integers(-3, 4, size=n).astype(float)  # utilities: many ties
    b = np.round(rng.normal(size=n), 1)  # ties on the other side too
    ref = _scipy_bootstrap(a, t, b, 50, 1)
    rng = np.random.default_rng(1)
    draws = np.stack([rng.integers(0, n, n) for _ in range(50)])
    got = metrics._resampled_kendall_tau(a, t, draws) - metrics._resampled_kendall_tau(b, t, draws)
    np.testing.assert_array_equal(got, ref)  # NaNs (all-tie resamples of n=3) in the same places


def test_bootstrap_ci_is_unchanged_from_the_scipy_loop():
    rng = np.random.default_rng(0)
    true = {i: float(rng.integers(-4, 5)) for i in range(120)}
    irm = {i: true[i] + rng.normal() for i in true}
    other = {i: rng.normal() for i in true}
    for o in (None, other):
        stats = _scipy_bootstrap(
            np.array([irm[w] for w in sorted(irm)]),
            np.array([true[w] for w in sorted(irm)]),
            None if o is None else np.array([o[w] for w in sorted(irm)]),
            1000,
            7,
        )
        ref = tuple(
            float(v) for v in np.nanpercentile(stats, [100 * (1 - 0.95) / 2, 100 * (1 + 0.95) / 2])
        )
        assert bootstrap_tau_ci(irm, true, other=o, seed=7) == ref
        assert ref[1] - ref[0] > 0.05  # a real interval, not a degenerate one


def test_a_nan_or_infinite_score_is_left_to_scipy_per_resample():
    """A NaN poisons only the resamples that draw it (nanpercentile drops them); in the pair
    sums it would poison all: such inputs take scipy's loop."""
    rng = np.random.default_rng(3)
    true = {i: float(rng.integers(-4, 5)) for i in range(30)}
    for bad in (float("nan"), float("inf")):
        irm = {i: true[i] + rng.normal() for i in true} | {2: bad}
        a = np.array([irm[w] for w in sorted(irm)])
        t = np.array([true[w] for w in sorted(irm)])
        ref = tuple(
            float(v)
            for v in np.nanpercentile(
                _scipy_bootstrap(a, t, None, 1000, 0), [100 * (1 - 0.95) / 2, 100 * (1 + 0.95) / 2]
            )
        )
        got = bootstrap_tau_ci(irm, true)
        assert got == ref and np.isfinite(got).all()

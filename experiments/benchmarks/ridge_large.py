"""Ridge over 1M positions x 16k SAE features on this machine (issue target: under 60 s).

    python experiments/benchmarks/ridge_large.py [--positions 1000000] [--features 16384] [--l0 32]

Synthetic TopK-like codes (``--l0`` active features per position, exponential magnitudes), a
planted sparse linear target (64 features) plus noise. Prints the fit time of ``fit_ridge_sparse``
(conjugate gradients, implicit standardisation), its iterations, held-out R^2 against the noise
ceiling, and how many planted features rank in the top 64 by |standardised weight|. For scale,
it also times the dense closed form (``fit_ridge``) on a subsample and extrapolates its cost.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.sparse as sp
import torch

from irmlens.irm.ridge import fit_ridge, fit_ridge_sparse, r2_score


def synthetic_codes(n: int, d: int, l0: int, rng) -> sp.csr_matrix:
    cols = rng.integers(0, d, size=(n, l0))
    vals = rng.exponential(1.0, size=(n, l0)).astype(np.float64)
    indptr = np.arange(0, n * l0 + 1, l0)
    x = sp.csr_matrix((vals.ravel(), cols.ravel(), indptr), shape=(n, d))
    x.sum_duplicates()
    return x


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--positions", type=int, default=1_000_000)
    p.add_argument("--features", type=int, default=16384)
    p.add_argument("--l0", type=int, default=32)
    p.add_argument("--alpha", type=float, default=100.0)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    n, d = args.positions, args.features
    t = time.perf_counter()
    x = synthetic_codes(n, d, args.l0, rng)
    planted = rng.choice(d, 64, replace=False)
    w = np.zeros(d)
    w[planted] = rng.normal(0, 1, 64)
    signal = x @ w
    noise_sd = signal.std()  # signal-to-noise 1: R^2 ceiling 0.5
    y = torch.from_numpy(signal + rng.normal(0, noise_sd, n))
    print(f"data: {n} x {d}, {x.nnz} non-zeros, built in {time.perf_counter() - t:.1f}s")
    n_fit = int(0.9 * n)
    t = time.perf_counter()
    model, iters = fit_ridge_sparse(x[:n_fit], y[:n_fit], args.alpha)
    fit_s = time.perf_counter() - t
    pred = torch.from_numpy(x[n_fit:] @ model.coef.numpy()) + model.intercept
    r2 = r2_score(y[n_fit:], pred)
    sd = np.sqrt(
        np.asarray(x[:n_fit].multiply(x[:n_fit]).mean(0)).ravel()
        - np.asarray(x[:n_fit].mean(0)).ravel() ** 2
    )
    top = np.argsort(-np.abs(model.coef.numpy() * sd))[:64]
    hits = len(set(top.tolist()) & set(planted.tolist()))
    print(
        f"fit_ridge_sparse: {fit_s:.1f}s ({iters} CG iterations) on {n_fit} positions "
        f"(target < 60 s); held-out R^2 {r2:.3f} (ceiling 0.5); planted features in top 64: {hits}/64"
    )
    # the dense closed form for scale: O(n d^2 + d^3); time it on a subsample and extrapolate
    n_sub, d_sub = 20000, 2048
    xs = torch.from_numpy(x[:n_sub, :d_sub].toarray())
    t = time.perf_counter()
    fit_ridge(xs, y[:n_sub], args.alpha)
    dense_s = time.perf_counter() - t
    gram_scale = (n_fit / n_sub) * (d / d_sub) ** 2
    solve_scale = (d / d_sub) ** 3
    print(
        f"dense fit_ridge on {n_sub} x {d_sub}: {dense_s:.2f}s -> at {n_fit} x {d} roughly "
        f"{dense_s * min(gram_scale, solve_scale):.0f}-{dense_s * max(gram_scale, solve_scale):.0f}s"
        f" (and {d * d * 8 / 1e9:.1f} GB for the Gram matrix)"
    )


if __name__ == "__main__":
    main()

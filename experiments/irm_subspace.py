"""Where does the implicit reward live in the activation difference? (docs/concepts.md)

    python experiments/irm_subspace.py RUN_DIR [--ms 1,2,4,8,16,32] [--draws 10]

Why: on every run so far a random dictionary matches the trained one, in the full IRM and in the
sparse one. This asks whether that is a property of the *signal* rather than of our dictionaries.
On a finished study run, with the raw residual differences a_rlhf - a_base of the studied layers
(concatenated) at the run's word positions and its fixed word split, the same ridge as the IRM
(``fit_and_score``) is fitted on

  * ``pca m``: the difference projected on its top m principal components (PCA on fit positions);
  * ``rest m``: the difference with those m components removed;
  * ``random m``: m random Gaussian directions (``--draws`` draws: mean and range);
  * ``word pca m``: the top m principal components of the per-word mean differences (every word
    seen >= 3 times among the fit positions, lexicon or not: context averaged out, no labels);
  * ``contrast m`` (when the run cached a null model): the m directions in which RLHF changed the
    activations most *relative to* the null fine-tuning, i.e. the top generalised eigenvectors of
    (cov of a_rlhf - a_base, cov of a_null - a_base + 0.1 * mean variance * I), both covariances
    over every cached position, as the dictionaries are trained (no labels, and positions of
    held-out words are a small part of them);
  * ``raw``: all of it (the ceiling the IRM's signal retention is measured against);

and the share of the raw ridge's held-out prediction variance that lies in the top m components
is printed. Held-out Kendall tau against the true utilities on the run's held-out words.

Reading, written down before the first run: if ``pca 8`` keeps >= 0.8 of the raw tau and
``random 32`` keeps >= 0.8 as well, the reward signal lies in the few dominant directions of the
difference, which random projections pick up; a trained dictionary can then only win below ~8
features, and only by aligning with those components. (It did not hold: see docs/concepts.md.
The ``contrast`` rows were added after that first run, as the next unsupervised candidate.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main() -> None:
    from finished_run import load_finished_run

    from irmlens.cache.store import hook_name, load_activations, load_manifest
    from irmlens.irm.fit import fit_and_score

    p = argparse.ArgumentParser()
    p.add_argument("run", type=Path)
    p.add_argument("--ms", default="1,2,4,8,16,32")
    p.add_argument("--draws", type=int, default=10)
    args = p.parse_args()
    run = load_finished_run(args.run)
    cfg, paths, layers, targets, split = run.cfg, run.paths, run.layers, run.targets, run.split
    at = targets.position
    models = load_manifest(paths.cache)["models"]

    def every_position(model: str) -> torch.Tensor:
        return torch.cat(
            [
                load_activations(paths.cache, model, hook_name(la, cfg.cache.hook_kinds[0]))
                - load_activations(paths.cache, "base", hook_name(la, cfg.cache.hook_kinds[0]))
                for la in layers
            ],
            dim=1,
        ).double()

    diff_all = every_position("rlhf")
    diff = diff_all[at]
    x_fit, x_held = diff[split.fit_positions], diff[split.heldout_positions]
    contrast = None
    if "null" in models:
        contrast = contrast_directions(diff_all, every_position("null"))
    del diff_all

    def tau(fit: torch.Tensor, held: torch.Tensor) -> float:
        return fit_and_score(fit.float(), held.float(), targets, split, cfg.irm).heldout_kendall_tau

    # per-word means over fit positions only (held-out words never shape a direction scored on them)
    fit_word = targets.word[split.fit_positions]
    counts = torch.bincount(fit_word, minlength=len(targets.words)).double()
    sums = torch.zeros(len(targets.words), diff.shape[1], dtype=diff.dtype)
    sums.index_add_(0, fit_word, x_fit)
    word_means = sums[counts >= 3] / counts[counts >= 3, None]
    _, _, word_vt = torch.linalg.svd(word_means - word_means.mean(0), full_matrices=False)

    mean = x_fit.mean(0)
    _, s, vt = torch.linalg.svd(x_fit - mean, full_matrices=False)
    variance = s**2 / (s**2).sum()
    raw = fit_and_score(x_fit.float(), x_held.float(), targets, split, cfg.irm)
    held_pred = raw.model.predict(x_held.float()).double()
    print(
        f"{args.run}: layers {layers}, d {diff.shape[1]}, {len(split.fit_positions)} fit / "
        f"{len(split.heldout_positions)} held-out positions, "
        f"{len(raw.heldout_irm)} held-out words; raw tau {raw.heldout_kendall_tau:+.3f}"
    )
    print(
        "participation ratio of the difference (fit positions): "
        f"{float(1 / (variance**2).sum()):.1f} of {diff.shape[1]}"
    )
    gen = torch.Generator().manual_seed(0)
    for m in (int(v) for v in args.ms.split(",")):
        top = vt[:m].T  # [d, m]
        pca = tau((x_fit - mean) @ top, (x_held - mean) @ top)
        word_top = word_vt[:m].T
        word_pca = tau(x_fit @ word_top, x_held @ word_top)
        rest = tau(x_fit - x_fit @ top @ top.T, x_held - x_held @ top @ top.T)
        # share of the raw IRM's held-out prediction variance carried by the top m components
        pred_top = raw.model.predict((mean + (x_held - mean) @ top @ top.T).float()).double()
        share = float(1 - (held_pred - pred_top).var() / held_pred.var())
        draws = []
        for _ in range(args.draws):
            r = torch.randn(diff.shape[1], m, generator=gen, dtype=torch.float64)
            draws.append(tau(x_fit @ r, x_held @ r))
        d = torch.tensor(draws)
        contrast_tau = (
            ""
            if contrast is None
            else (f"contrast {tau(x_fit @ contrast[:, :m], x_held @ contrast[:, :m]):+.3f}; ")
        )
        print(
            f"m={m:3d}: variance {float(variance[:m].sum()):.3f}; pca {pca:+.3f} "
            f"({pca / raw.heldout_kendall_tau:.2f} of raw); rest {rest:+.3f}; word pca {word_pca:+.3f}; {contrast_tau}random "
            f"{float(d.mean()):+.3f} [{float(d.min()):+.3f}, {float(d.max()):+.3f}] "
            f"({float(d.mean()) / raw.heldout_kendall_tau:.2f} of raw); raw IRM prediction "
            f"variance in these components {share:.2f}"
        )


def contrast_directions(diff: torch.Tensor, null_diff: torch.Tensor, ridge: float = 0.1):
    """Directions v maximising var(diff @ v) / var(null_diff @ v) (columns, largest ratio first):
    where RLHF moved the activations more than fine-tuning against a shuffled lexicon did. The
    null covariance gets ``ridge`` times its mean variance on the diagonal (it is near-singular)."""

    def cov(x: torch.Tensor) -> torch.Tensor:
        x = x - x.mean(0)
        return x.T @ x / len(x)

    s_rlhf, s_null = cov(diff), cov(null_diff)
    s_null = s_null + ridge * s_null.diagonal().mean() * torch.eye(len(s_null), dtype=s_null.dtype)
    inv_chol = torch.linalg.inv(torch.linalg.cholesky(s_null))
    _, vectors = torch.linalg.eigh(inv_chol @ s_rlhf @ inv_chol.T)
    return inv_chol.T @ vectors.flip(1)


if __name__ == "__main__":
    main()

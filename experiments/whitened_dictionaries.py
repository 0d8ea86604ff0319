"""Do whitened dictionaries give sparse IRMs that beat a random dictionary? (docs/concepts.md)

    python experiments/whitened_dictionaries.py runs/tiny [--ks 4,8,16,32] [--seed 0]

On a finished study run: trains one shared SAE per studied layer on PCA-whitened activations of
every cached model (sae-lens's covariance_whitening; width, L1 and schedule from the run's
``[sae]`` config, widest width), then fits sparse IRMs (OMP selection of k encoder
pre-activation differences of the studied layers, then ridge; ``irmlens.irm.fit.sparse_irm``) in
three dictionaries: the whitened SAE, a random SAE (sae-lens init), and a random SAE in the same
whitened space. Scored two ways: the run's fixed held-out word split, and 5-fold cross-fitting
over all lexicon words (each word predicted by a fit that did not see it). Prints held-out
Kendall tau and the paired bootstrap 95% CI of tau(whitened SAE) - tau(control) per k.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import replace
from pathlib import Path

import torch


def main() -> None:
    from finished_run import load_finished_run

    from irmlens.cache.store import hook_name, load_activations, load_manifest
    from irmlens.irm.fit import sparse_irm, word_split
    from irmlens.irm.metrics import bootstrap_tau_ci, kendall_tau
    from sae_training.train import encode_batched, load_sae, load_whitening, train_sae
    from sae_training.train import random_sae as _random_sae

    p = argparse.ArgumentParser()
    p.add_argument("run", type=Path)
    p.add_argument("--ks", default="4,8,16,32")
    p.add_argument("--seed", type=int, default=0, help="seed of the whitened SAEs")
    p.add_argument("--folds", type=int, default=5)
    args = p.parse_args()
    run = load_finished_run(args.run)
    cfg, paths, layers, targets = run.cfg, run.paths, run.layers, run.targets
    hooks = [hook_name(la, cfg.cache.hook_kinds[0]) for la in layers]  # the studied kind
    models = load_manifest(paths.cache)["models"]
    acts = {m: [load_activations(paths.cache, m, h) for h in hooks] for m in models}
    d_model = acts["base"][0].shape[1]
    width = int(max(cfg.sae.width_multipliers) * d_model)

    whitened, random_plain, random_whitened = [], [], []
    for i, h in enumerate(hooks):
        out = paths.root / "experiments" / f"whitened-seed{args.seed}" / h
        if not out.exists():
            tcfg = replace(
                cfg.sae.training_config(width, args.seed, cfg.model.device),
                normalize="covariance_whitening",
            )
            train_sae(torch.cat([acts[m][i] for m in models]), tcfg, h, "shared", out_dir=out)
        sae = load_sae(out)
        whitened.append(sae)
        random_plain.append(_random_sae(d_model, width, cfg.seed + 1 + i, like=sae))
        random_whitened.append(
            _random_sae(d_model, width, cfg.seed + 1 + i, like=sae, whitening=load_whitening(out))
        )

    at = targets.position

    def differences(saes) -> torch.Tensor:
        """Encoder pre-activation differences (rlhf - base) at every word position."""
        return torch.cat(
            [
                encode_batched(s, acts["rlhf"][i][at], pre_activation=True)
                - encode_batched(s, acts["base"][i][at], pre_activation=True)
                for i, s in enumerate(saes)
            ],
            dim=1,
        )

    spaces = {
        "whitened SAE": differences(whitened),
        "random SAE": differences(random_plain),
        "random SAE, whitened": differences(random_whitened),
    }

    fixed = run.split
    counts = torch.bincount(targets.word, minlength=len(targets.words))
    lexicon = sorted(w for w in targets.utility if counts[w] >= cfg.irm.min_word_count)
    shuffled = lexicon[:]
    random.Random(0).shuffle(shuffled)
    folds = []
    for f in range(args.folds):  # each fold's held-out words; the others fit
        held = sorted(shuffled[f :: args.folds])
        folds.append(word_split(targets, sorted(set(lexicon) - set(held)), held, cfg.irm, f))
    print(
        f"{args.run}: layers {layers}, width {width}, {len(lexicon)} lexicon words "
        f"({len(fixed.heldout_words)} held out by the run's split, seed {cfg.irm.seed})"
    )
    for k in (int(v) for v in args.ks.split(",")):
        for protocol, splits in (("fixed split", [fixed]), (f"{args.folds}-fold cross-fit", folds)):
            preds = {name: {} for name in spaces}
            for sp in splits:
                for name, x in spaces.items():
                    fit, _ = sparse_irm(
                        x[sp.fit_positions], x[sp.heldout_positions], targets, sp, cfg.irm, k
                    )
                    preds[name].update(fit.heldout_irm)
            words = sorted(preds["whitened SAE"])
            taus = {
                n: kendall_tau([v[w] for w in words], [targets.utility[w] for w in words])
                for n, v in preds.items()
            }
            line = ", ".join(f"{n} {t:+.3f}" for n, t in taus.items())
            cis = []
            for name in ("random SAE", "random SAE, whitened"):
                lo, hi = bootstrap_tau_ci(
                    preds["whitened SAE"], targets.utility, other=preds[name], seed=cfg.irm.seed
                )
                cis.append(f"vs {name} [{lo:+.3f}, {hi:+.3f}]")
            print(
                f"k={k:2d} {protocol:18s} n={len(words)}: {line}; difference CI " + ", ".join(cis)
            )


if __name__ == "__main__":
    main()

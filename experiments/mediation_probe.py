"""Where does a finished run's RLHF gain live, and in which basis is it compact? (issue 30)

    python experiments/mediation_probe.py RUN_DIR [--rows 64] [--out mediation.json]

On the run's cached held-out rows (the first ``--rows`` to measure on, the next ``--rows`` to fit
the data-fitted bases on: disjoint), with the expected next-token utility under the run's reward
model (``irmlens.mediate.metrics``):

* the layer sweep (``irmlens.mediate.sweep``): the base's activations patched into the RLHF model
  at the embedding and after each block (share of the gain removed), and the reverse (share
  reproduced); the final norm and unembedding hold what the last block's patch leaves;
* at each studied layer's ``resid_post``, the faithfulness curves (``irmlens.mediate.curves``)
  of every basis: the run's shared SAE (each width), the base model's SAE, the wide TopK SAE
  when there is one, the random-SAE control, the standard basis, a random rotation, the
  principal directions of the differences and the mean-difference direction; necessity
  (removed) and sufficiency (reproduced), relative to patching the whole layer.

Written down before the first run on the tiny default: the issue's probe found the top principal
direction removing ~130% of layer 2's share at k = 1 and the shared SAE 16% at k = 8; if this
instrument (which counts overshoot as unfaithful) agrees, the mean-difference / PCA bases reach
faithfulness 0.8 at k <= 4 and the dictionaries need >= 32.

This is the measurement the ``mediate`` stage will make; it prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    from irmlens.bases.linear import (
        mean_difference_basis,
        pca_of_differences,
        random_orthonormal,
        standard_basis,
    )
    from irmlens.cache.store import load_token_rows
    from irmlens.config import load_config
    from irmlens.mediate.curves import faithfulness_curve, model_site
    from irmlens.mediate.metrics import token_utility
    from irmlens.mediate.sweep import layer_sweep
    from irmlens.run import RunPaths
    from irmlens.stages.context import StudyContext

    p = argparse.ArgumentParser()
    p.add_argument("run", type=Path)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    paths = RunPaths(args.run)
    ctx = StudyContext(load_config(paths.config, check_device=False, new_run=False), paths)
    torch.manual_seed(0)
    models = ctx.pair.get()
    base, rlhf = models["base"], models["rlhf"]
    utility = token_utility(ctx.pair.tokenizer, ctx.rm.word_utility, rlhf.cfg.d_vocab)
    rows = load_token_rows(paths.cache)
    n = args.rows
    tokens, mask = rows.tokens[:n], rows.valid[:n]
    fit_tokens = rows.tokens[n : 2 * n]
    sweep = layer_sweep(base, rlhf, tokens, mask, utility, n_boot=500)
    print(f"expected utility: base {sweep['base']:.4f}, rlhf {sweep['rlhf']:.4f} ({n} rows)")
    for row in sweep["sites"]:
        print(
            f"  {row['site']:28s} removed {row['removed']:+.2f} "
            f"[{row['removed_ci'][0]:+.2f}, {row['removed_ci'][1]:+.2f}]  reproduced "
            f"{row['reproduced']:+.2f} [{row['reproduced_ci'][0]:+.2f}, "
            f"{row['reproduced_ci'][1]:+.2f}]"
        )
    print(f"  final norm and unembedding: {sweep['final_norm_and_unembedding']:+.2f}")
    out = {"sweep": sweep, "layers": {}}
    for layer in sorted(ctx.studied_layers):
        hook = f"blocks.{layer}.hook_resid_post"

        def acts(model, toks, hook=hook):
            return model.run_with_cache(toks, names_filter=hook)[1][hook].float()

        a_b, a_r = acts(base, tokens), acts(rlhf, tokens)
        f_b, f_r = acts(base, fit_tokens), acts(rlhf, fit_tokens)
        site = model_site(rlhf, tokens, mask, utility, hook, a_b, a_r)
        back = model_site(base, tokens, mask, utility, hook, a_b, a_r)
        d = a_b.shape[-1]
        bases = {"shared SAE": ctx.sae("shared", layer), "base SAE": ctx.sae("base", layer)}
        if layer == ctx.irm_layer and ctx.cfg.sae.wide_topk.k:
            bases["wide TopK SAE"] = ctx.sae(ctx.wide_topk_label, layer)
        bases |= {
            "random SAE": ctx.random_sae("shared", layer, 12345),
            "standard": standard_basis(d),
            "random rotation": random_orthonormal(d, seed=0),
            "PCA of differences": pca_of_differences(f_b, f_r),
            "mean difference": mean_difference_basis(f_b, f_r),
        }
        mean_dir = bases["mean difference"].W_dec[0]
        pc1 = bases["PCA of differences"].W_dec[0]
        print(
            f"\nlayer {layer} ({hook}); cos(mean difference, top PC) {float(mean_dir @ pc1):+.3f}"
        )
        print(
            f"  {'basis':20s} {'k=1':>6s} {'k=8':>6s} {'k=32':>6s} {'k=256':>6s} area  k80  (removed | reproduced)"
        )
        out["layers"][str(layer)] = {}
        for name, basis in bases.items():
            res = {}
            for direction, s in (("removed", site), ("reproduced", back)):
                c = faithfulness_curve(basis, s, removed=direction == "removed")
                c.pop("rows"), c.pop("start_rows")
                res[direction] = c
            out["layers"][str(layer)][name] = res
            line = []
            for direction in ("removed", "reproduced"):
                c = res[direction]
                by_k = {x["k"]: x["share"] for x in c["curve"]}
                cells = " ".join(f"{by_k.get(k, by_k[max(by_k)]):6.2f}" for k in (1, 8, 32, 256))
                line.append(f"{cells} {c['area']:.2f} {c['k_at_80']}")
            print(f"  {name:20s} " + " | ".join(line))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()

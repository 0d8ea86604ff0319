"""Stage ``mediate``: where the RLHF gain lives, measured causally on fixed text (``mediate/``).

On cached held-out rows, with the expected next-token utility under the study's reward model
(with ``data.lexicon = "none"``, the implicit-reward lexicon of stage ``target``):

1. the layer sweep: the base's activations patched into the RLHF model at the embedding and
   after each block remove a share of the gain, the RLHF's patched into the base reproduce one;
   the final norm and unembedding hold what the last block's patch leaves;
2. at each studied layer, every basis's faithfulness curve, both ways: the study's dictionaries
   (through the basis registry) and their random stand-in, beside the standard basis, a random
   rotation, the principal directions of the differences and the mean-difference direction
   (the last two fitted on rows disjoint from the measured ones); the sparse IRM's features
   placed on the same axes;
3. a verdict naming the most compact basis at each layer.

Written into a temporary folder that replaces ``mediate/`` in one rename.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from irmlens.io import atomic_dir, atomic_write_json, read_json
from irmlens.stages.context import StudyContext, log


def run(ctx: StudyContext) -> None:
    from irmlens.cache.store import load_token_rows
    from irmlens.mediate.metrics import token_utility
    from irmlens.mediate.sweep import layer_sweep

    started, m = time.perf_counter(), ctx.cfg.mediate
    models = ctx.pair.get()
    base, rlhf = models["base"], models["rlhf"]
    utility = token_utility(ctx.pair.tokenizer, ctx.rm.word_utility, rlhf.cfg.d_vocab)
    rows = load_token_rows(ctx.paths.cache)
    n = min(m.n_rows, len(rows.tokens) // 2)
    measured = rows.tokens[:n], rows.valid[:n]
    fit_tokens = rows.tokens[n : 2 * n]
    sweep = layer_sweep(base, rlhf, *measured, utility, n_boot=m.n_bootstrap, seed=m.seed)
    irm = read_json(ctx.paths.irm_metrics)
    layers = {
        str(la): _layer(ctx, base, rlhf, utility, measured, fit_tokens, la, irm)
        for la in sorted(ctx.studied_layers)
    }
    result = {
        "metric": "expected next-token utility: mean over positions of sum_v pi(v | context) u(v)",
        "rows": {"measured": n, "fit": int(len(fit_tokens))},
        "sweep": sweep,
        "layers": layers,
        "verdict": verdict(sweep, layers),
        "seconds": time.perf_counter() - started,
    }
    with atomic_dir(ctx.paths.mediate) as tmp:
        atomic_write_json(tmp / "mediation.json", result)
    log(f"mediate: {result['verdict']} ({result['seconds']:.0f} s)")


def _bases(ctx: StudyContext, layer: int, fit_base, fit_rlhf) -> dict[str, object]:
    """Every basis compared at ``layer``: the registry's dictionaries (kinds that encode), the
    shared dictionary's random stand-in, and the non-dictionary bases."""
    from irmlens.bases import BASES, load_bases
    from irmlens.bases.linear import (
        mean_difference_basis,
        pca_of_differences,
        random_orthonormal,
        standard_basis,
    )

    seed, d = ctx.cfg.mediate.seed, fit_base.shape[-1]
    found, _ = load_bases(ctx, [layer], layer, ctx.hook_kind)
    out = {
        name: loaded[0][0]
        for name, loaded in found.items()
        if loaded and hasattr(loaded[0][0], "encode")  # a crosscoder's reading does not encode
    }
    if "shared" in found:
        basis, folder = found["shared"][0]
        out["random_sae"] = BASES["shared"].random_stand_in(basis, folder, seed, d)
    return out | {
        "standard": standard_basis(d),
        "random_rotation": random_orthonormal(d, seed),
        "pca_of_differences": pca_of_differences(fit_base, fit_rlhf),
        "mean_difference": mean_difference_basis(fit_base, fit_rlhf),
    }


DICTIONARIES = ("shared", "base", "wide_topk", "random_sae")  # the rest are not dictionaries


def _layer(ctx: StudyContext, base, rlhf, utility, measured, fit_tokens, layer: int, irm) -> dict:
    """The faithfulness curves of every basis at ``layer`` (both ways), and the sparse IRM's
    features placed on them."""
    from irmlens.mediate.curves import KS, faithfulness_curve, model_site, set_share

    m, hook = ctx.cfg.mediate, ctx.hook(layer)

    def acts(model, tokens):
        return model.run_with_cache(tokens, names_filter=hook)[1][hook].float()

    tokens, mask = measured
    a_b, a_r = acts(base, tokens), acts(rlhf, tokens)
    sites = {
        "removed": model_site(rlhf, tokens, mask, utility, hook, a_b, a_r),
        "reproduced": model_site(base, tokens, mask, utility, hook, a_b, a_r),
    }
    fit_b, fit_r = acts(base, fit_tokens), acts(rlhf, fit_tokens)
    bases = _bases(ctx, layer, fit_b, fit_r)
    ks = [k for k in KS if k <= m.max_k]
    curves = {}
    for name, basis in bases.items():
        curves[name] = {"dictionary": name in DICTIONARIES}
        for direction, site in sites.items():
            c = faithfulness_curve(basis, site, direction == "removed", ks, m.recheck)
            c.pop("rows"), c.pop("start_rows")
            c["ranked"] = c["ranked"][:32]
            curves[name][direction] = c
    mean_dir, pc1 = bases["mean_difference"].W_dec[0], bases["pca_of_differences"].W_dec[0]
    out = {
        "hook": hook,
        "bases": curves,
        "cos_mean_difference_top_pc": float(mean_dir @ pc1),
        "reward_direction": _reward_direction(ctx, rlhf, fit_tokens, fit_b, fit_r, acts),
    }
    features = [
        r["local_feature"]
        for r in irm["sparse"]["feature_refs"]
        if r["layer"] == layer and r["dictionary"] == "shared"
    ]
    if features and "shared" in bases:
        out["sparse_irm"] = {
            "n_features": len(features),
            "removed": set_share(bases["shared"], sites["removed"], features, True),
            "reproduced": set_share(bases["shared"], sites["reproduced"], features, False),
        }
    return out


def _reward_direction(ctx: StudyContext, rlhf, fit_tokens, fit_b, fit_r, acts) -> dict:
    """The mean RLHF - base difference (on the fit rows) read through the RLHF model's output,
    its norm, and its cosine with the null pair's mean difference (what any fine-tuning moves)."""
    from irmlens.mediate.directions import read_direction

    d = fit_b.shape[-1]
    mean = (fit_r - fit_b).reshape(-1, d).mean(0)
    out = {"norm": float(mean.norm())} | read_direction(rlhf, mean, ctx.pair.tokenizer)
    null = ctx.pair.get().get("null")
    if null is not None:
        null_mean = (acts(null, fit_tokens) - fit_b).reshape(-1, d).mean(0)
        cos = torch.nn.functional.cosine_similarity(mean, null_mean, dim=0)
        out["null_cosine"], out["null_norm"] = float(cos), float(null_mean.norm())
    return out


def _best(curves: dict, names, direction: str = "removed") -> tuple[str, dict] | None:
    """The most compact of ``names``: the smallest k reaching faithfulness 0.8, then area."""
    ranked = sorted(
        (n for n in names if n in curves),
        key=lambda n: (curves[n][direction]["k_at_80"] or 10**9, -curves[n][direction]["area"]),
    )
    return (ranked[0], curves[ranked[0]][direction]) if ranked else None


def verdict(sweep: dict, layers: dict) -> str:
    """One sentence per studied layer: its share of the gain, the most compact basis, and the
    best dictionary beside it."""
    from irmlens.mediate.curves import share_at

    share = {row["site"]: row["removed"] for row in sweep["sites"]}
    parts = [
        f"the final norm and unembedding hold {sweep['final_norm_and_unembedding']:.0%} of the "
        "gain (what patching the last block's output leaves)"
    ]
    for la, res in layers.items():
        curves = res["bases"]
        best = _best(curves, curves)
        best_dict = _best(
            curves, [n for n in curves if curves[n]["dictionary"] and n != "random_sae"]
        )
        # the residual stream after the block (an mlp_out study's curves sit inside the block)
        carried = share.get(f"blocks.{la}.hook_resid_post", float("nan"))
        text = f"layer {la} carries {carried:.0%} of the gain"
        if best:
            k = best[1]["k_at_80"]
            text += (
                f"; the most compact basis is {best[0]} ({'k = ' + str(k) if k else 'no k'} for "
                "80% of the layer's share)"
            )
        if best_dict:
            k = best_dict[1]["k_at_80"]
            text += (
                f", the best dictionary {best_dict[0]} "
                + (f"needs k = {k}" if k else "does not reach 80%")
                + f" ({share_at(best_dict[1], 8):.0%} at k = 8)"
            )
        parts.append(text)
    return "; ".join(parts) + "."


def outputs(paths) -> list[Path]:
    return [paths.mediate]


def done(ctx: StudyContext) -> bool:
    return (ctx.paths.mediate / "mediation.json").exists()

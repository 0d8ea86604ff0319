"""Stage ``mediate``: where the RLHF gain lives, measured causally on fixed text (``mediate/``).

Two text sets: cached held-out rows, and the RLHF model's own completions to prompts cut from
other cached rows (the distribution it was tuned on). Two deterministic metrics on each
(``irmlens.mediate.metrics``): the expected next-token utility under the study's reward model
(with ``data.lexicon = "none"``, the implicit-reward lexicon of stage ``target``) and the
implicit reward itself. Then:

1. the layer sweep: the base's activations patched into the RLHF model at the embedding and
   after each block (and at each MLP's output where the cache has them) remove a share of the
   gain, the RLHF's patched into the base reproduce one; the final norm and unembedding hold
   what the last block's patch leaves; the studied layers' share is stated, and warned about
   when small;
2. at each studied layer, on cached rows with ``mediate.metric``: every basis's faithfulness
   curve, both ways: the study's dictionaries (through the basis registry: the shared and base
   SAEs, the wide TopK, the dictionary of differences; at the IRM layer the crosscoder read as
   a basis of the change) and the shared SAE's random stand-in, beside the standard basis, a random rotation, the principal directions of the
   differences and the mean-difference direction (the last two fitted on rows disjoint from
   the measured ones); the best dictionary against the best other basis with a paired CI; the
   sparse IRM's features and every validation set placed on the same axes;
3. the reward direction (the mean difference) read through the output, beside the null pair's,
   decomposed into the shared dictionary's features, with the contexts it moves most;
4. a verdict naming the most compact basis at each layer.

Written into a temporary folder that replaces ``mediate/`` in one rename.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from irmlens.io import atomic_dir, atomic_write_json, read_json
from irmlens.stages.context import StudyContext, log

# below this share of the gain at every studied layer, the report warns that the studied
# layers miss most of what RLHF changed (SmolLM2's weight-delta layer: 5%)
SMALL_SHARE = 0.25


def run(ctx: StudyContext) -> None:
    from irmlens.cache.store import load_token_rows
    from irmlens.mediate.metrics import METRICS, token_utility
    from irmlens.mediate.sweep import layer_sweep, sweep_sites

    started, m = time.perf_counter(), ctx.cfg.mediate
    base, rlhf = (ctx.pair.get()[k] for k in ("base", "rlhf"))
    rows = load_token_rows(ctx.paths.cache)
    n = min(m.n_rows, len(rows.tokens) // 3)  # measured, fitted, prompted: disjoint thirds
    # u(v) once: reading every vocabulary item as a word takes seconds on a 49k vocabulary
    utility = token_utility(ctx.pair.tokenizer, ctx.rm.word_utility, rlhf.cfg.d_vocab)
    texts = {
        "cached_rows": _cached_rows(ctx, rows, slice(0, n), utility).with_base(base),
        "own_completions": _own_completions(
            ctx, rlhf, rows, slice(2 * n, 3 * n), utility
        ).with_base(base),
    }
    mlp_out = m.mlp_out and "mlp_out" in ctx.cfg.cache.hook_kinds
    sites = sweep_sites(rlhf.cfg.n_layers, mlp_out=mlp_out)
    sweeps = [
        {"text": text, **per_metric}
        for text, metrics in texts.items()
        for per_metric in layer_sweep(
            base, rlhf, metrics.tokens, metrics, sites, m.n_bootstrap, m.seed
        ).values()
    ]
    _null_beside(ctx, texts, sweeps)
    sweep = next(s for s in sweeps if s["text"] == "cached_rows" and s["metric"] == m.metric)
    irm = read_json(ctx.paths.irm_metrics)
    measured = texts["cached_rows"]
    fit_tokens = rows.tokens[n : 2 * n]
    sets = _validation_sets(ctx)
    layers = {
        str(la): _layer(ctx, base, rlhf, measured, fit_tokens, la, irm, sets)
        for la in sorted(ctx.studied_layers)
    }
    result = {
        "metric": METRICS[m.metric],
        "metrics": METRICS,
        "rows": {
            "measured": n,
            "fit": int(len(fit_tokens)),
            "prompts": int(len(texts["own_completions"].tokens)),
        },
        "sweep": sweep,
        "sweeps": sweeps,
        "studied": studied_share(
            sweep, sorted(ctx.studied_layers), rm_free=ctx.cfg.data.lexicon == "none"
        ),
        "layers": layers,
        "verdict": verdict(sweep, layers),
        "seconds": time.perf_counter() - started,
    }
    with atomic_dir(ctx.paths.mediate) as tmp:
        atomic_write_json(tmp / "mediation.json", result)
    log(f"mediate: {result['verdict']} ({result['seconds']:.0f} s)")
    if result["studied"]["warning"]:
        log(f"mediate: warning: {result['studied']['warning']}")


def _null_beside(ctx: StudyContext, texts: dict, sweeps: list[dict]) -> None:
    """Each sweep's metric of the null model (tuned like the RLHF model against the null reward)
    on the same text: a gain that the null pair shows too is what any tuning moves."""
    from irmlens.mediate.sweep import run_metrics

    null = ctx.pair.get().get("null")
    if null is None:
        return
    for text, metrics in texts.items():
        values = run_metrics(null, metrics.tokens, metrics)
        for s in sweeps:
            if s["text"] == text:
                s["null"] = float(values[s["metric"]].mean())


def _cached_rows(ctx: StudyContext, rows, index: slice, utility):
    """The cached rows' metrics: expected utility at every valid position, implicit reward on
    the tokens of the words the reward model scores."""
    from irmlens.mediate.metrics import RewardMetrics, word_token_mask

    word_utility = ctx.rm.word_utility
    scored_words = {i for i, w in enumerate(rows.words) if word_utility(w) is not None}
    in_word = None if rows.in_word is None else rows.in_word[index]
    scored = word_token_mask(rows.word_id[index], in_word, rows.valid[index], scored_words)
    return RewardMetrics(
        rows.tokens[index], rows.valid[index], utility, scored, beta=ctx.cfg.rlhf.kl_coef
    )


def _own_completions(ctx: StudyContext, rlhf, rows, index: slice, utility):
    """The RLHF model's own completions (``rlhf.max_completion_length`` tokens, temperature 1)
    of prompts cut from cached rows: expected utility where it predicts the completion,
    implicit reward over the completion's tokens (its sequence-level implicit reward)."""
    from irmlens.mediate.metrics import RewardMetrics

    m = ctx.cfg.mediate
    p = min(m.prompt_tokens, rows.tokens.shape[1] - 1)
    whole = rows.valid[index][:, 1:p].all(1)  # BOS, then text (BOS is never a valid position)
    prompts = rows.tokens[index][whole][:, :p]
    new = ctx.cfg.rlhf.max_completion_length
    device = next(rlhf.parameters()).device
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(m.seed)
        tokens = rlhf.generate(
            prompts.to(device),
            max_new_tokens=new,
            stop_at_eos=False,
            do_sample=True,
            temperature=1.0,
            verbose=False,
            return_type="tokens",
        ).cpu()
    positions = torch.arange(tokens.shape[1])
    predicting = ((positions >= p - 1) & (positions < tokens.shape[1] - 1)).expand_as(tokens)
    scored = (positions >= p).expand_as(tokens)
    return RewardMetrics(tokens, predicting, utility, scored, beta=ctx.cfg.rlhf.kl_coef)


def studied_share(sweep: dict, layers: list[int], rm_free: bool = False) -> dict:
    """The share of the gain each studied layer's output carries (removed when patched), and a
    warning when every one carries less than ``SMALL_SHARE``."""
    share = {row["site"]: row["removed"] for row in sweep["sites"]}
    by_layer = {str(la): share.get(f"blocks.{la}.hook_resid_post") for la in layers}
    known = [v for v in by_layer.values() if v is not None]
    best = max(known, default=None)
    peak = max(
        (r for r in sweep["sites"] if r["site"].endswith("resid_post")),
        key=lambda r: r["removed"],
        default=None,
    )
    warning = None
    if best is not None and best < SMALL_SHARE:
        warning = (
            f"the studied layers carry at most {best:.0%} of the gain (patching the base's "
            f"activations there removes no more); the gain builds up later, "
            f"{1 - sweep['final_norm_and_unembedding']:.0%} by the last block's output and the rest "
            "in the final norm and unembedding: choose later layers "
            + (
                "(a larger layers.top_k)"
                if rm_free  # the mediation ranking needs a reward model before the cache
                else '(layers.select = "mediation")'
            )
            + " to study what carries the reward"
        )
    return {
        "layers": by_layer,
        "max_share": best,
        "peak_site": peak["site"] if peak else None,
        "warning": warning,
    }


def _bases(ctx: StudyContext, layer: int, fit_base, fit_rlhf) -> dict[str, object]:
    """Every basis compared at ``layer``, each with whether it is a dictionary: the registry's
    (kinds that encode: the trained dictionaries), the shared dictionary's random stand-in, and
    the non-dictionary bases."""
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
        name: (loaded[0][0], True)
        for name, loaded in found.items()
        if loaded and hasattr(loaded[0][0], "encode")  # a crosscoder's reading does not encode
    }
    if "shared" in found:
        basis, folder = found["shared"][0]
        out["random_sae"] = (BASES["shared"].random_stand_in(basis, folder, seed, d), True)
    if ctx.cfg.mediate.every_width:  # every width of the per-model and shared SAEs
        from sae_training.train import load_sae

        for label in ("shared", "base", "rlhf"):
            for width in ctx.widths:
                folder = ctx.paths.sae_dir(label, ctx.hook(layer), width)
                if folder.exists() and not (label in out and width == ctx.widest):
                    out[f"{label}_w{width}"] = (load_sae(folder), True)
    return out | {
        "standard": (standard_basis(d), False),
        "random_rotation": (random_orthonormal(d, seed), False),
        "pca_of_differences": (pca_of_differences(fit_base, fit_rlhf), False),
        "mean_difference": (mean_difference_basis(fit_base, fit_rlhf), False),
    }


def _crosscoders(ctx: StudyContext, layer: int, tokens, acts) -> dict[str, tuple]:
    """The crosscoder's views (all its latents; the RLHF-only ones) as bases of the change at
    the measured positions (``CrosscoderChangeBasis``: a joint code needs every model's
    activations there, the null model's too); the crosscoder sits at the IRM layer."""
    from irmlens.bases.linear import CrosscoderChangeBasis

    views = ctx.crosscoder_views() if layer == ctx.irm_layer else {}
    out, others, models = {}, None, ctx.pair.get()
    for name, loaded in views.items():
        reading = loaded[0][0]
        if others is None:
            others = {
                m: acts(models[m], tokens) for m in reading.models if m not in ("base", "rlhf")
            }
        out[name] = (CrosscoderChangeBasis(reading, others), True)
    return out


def _validation_sets(ctx: StudyContext) -> list:
    """The validation's feature sets, from the same builders and seeds the validate stage uses
    (so the same features), to be placed on the curves' axes."""
    from irmlens.validate.sets import Workbench, build_sets

    rlhf, tokenizer = ctx.hf_model("rlhf")  # the reward-logit set reads its unembedding
    acts = {m: {la: ctx.activations(m, la) for la in ctx.studied_layers} for m in ("base", "rlhf")}
    return build_sets(ctx.set_inputs(Workbench({"rlhf": rlhf}, tokenizer, acts)))


def _placed(sets: list, layer: int, sites: dict) -> list[dict]:
    """Each validation set's features at ``layer`` (of a basis that encodes), patched exactly:
    the share of the layer's gain they remove and reproduce."""
    from irmlens.mediate.curves import set_share

    out = []
    for fs in sets:
        basis, features = fs.bases.get(layer), fs.features.get(layer) or []
        if not features or not hasattr(basis, "encode"):
            continue
        out.append(
            {
                "set": fs.name,
                "dictionary": fs.dictionary,
                "n_features": len(features),
                **{
                    d: set_share(basis, site, features, d == "removed") for d, site in sites.items()
                },
            }
        )
    return out


def _layer(
    ctx: StudyContext, base, rlhf, measured, fit_tokens, layer: int, irm, sets: list
) -> dict:
    """The faithfulness curves of every basis at ``layer`` (both ways), the best dictionary
    against the best other basis, the sparse IRM's features on the same axes, and the reward
    direction."""
    from irmlens.mediate.curves import KS, faithfulness_curve, model_site, set_share

    m, hook = ctx.cfg.mediate, ctx.hook(layer)

    def acts(model, tokens):  # the blocks after the hook's need not run
        return model.run_with_cache(tokens, names_filter=hook, stop_at_layer=layer + 1)[1][
            hook
        ].float()

    def metric(logits):
        return measured.one(logits, m.metric)

    tokens = measured.tokens
    a_b, a_r = acts(base, tokens), acts(rlhf, tokens)
    sites = {
        "removed": model_site(rlhf, tokens, metric, hook, a_b, a_r),
        "reproduced": model_site(base, tokens, metric, hook, a_b, a_r),
    }
    fit_b, fit_r = acts(base, fit_tokens), acts(rlhf, fit_tokens)
    found = _bases(ctx, layer, fit_b, fit_r) | _crosscoders(ctx, layer, tokens, acts)
    bases = {name: basis for name, (basis, _) in found.items()}
    ks = [k for k in KS if k <= m.max_k]
    curves = {
        name: {"dictionary": found[name][1]}
        | {
            direction: faithfulness_curve(basis, site, direction == "removed", ks, m.recheck)
            for direction, site in sites.items()
        }
        for name, basis in bases.items()
    }
    out = {
        "hook": hook,
        "bases": curves,
        "comparison": _comparison(curves, sites, m),
        "cos_mean_difference_top_pc": float(
            bases["mean_difference"].W_dec[0] @ bases["pca_of_differences"].W_dec[0]
        ),
    }
    for c in curves.values():  # per-row values served the paired CIs
        for direction in sites:
            c[direction].pop("rows"), c[direction].pop("start_rows")
            c[direction]["ranked"] = c[direction]["ranked"][:32]
    out["reward_direction"] = _reward_direction(
        ctx, rlhf, layer, bases, (fit_tokens, fit_b, fit_r), (tokens, a_b, a_r), sites, acts
    )
    out["top_components"] = _top_components(ctx, rlhf, layer, bases, curves)
    out["validation_sets"] = _placed(sets, layer, sites)
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


def _comparison(curves: dict, sites: dict, m) -> dict:
    """Per direction, the best dictionary (the random one aside) minus the best non-dictionary
    basis, in faithfulness at k = 8 and on the area, with paired bootstrap CIs over rows."""
    from irmlens.mediate.curves import paired_difference

    out = {}
    for direction, site in sites.items():
        real = [n for n in curves if curves[n]["dictionary"] and n != "random_sae"]
        best_dict = _best(curves, real, direction)
        best_other = _best(curves, [n for n in curves if not curves[n]["dictionary"]], direction)
        if not best_dict or not best_other:
            continue
        a, b = best_dict[1], best_other[1]
        out[direction] = {
            "dictionary": best_dict[0],
            "other": best_other[0],
            "at_8": paired_difference(a, b, site, 8, m.n_bootstrap, m.seed),
            "area": paired_difference(a, b, site, None, m.n_bootstrap, m.seed),
        }
    return out


def _reward_direction(ctx, rlhf, layer, bases, fit, measured, sites, acts) -> dict:
    """The mean RLHF - base difference (on the fit rows) read through the RLHF model's output;
    its cosine with the null pair's mean difference (what any fine-tuning moves); its
    decomposition into the shared dictionary's features; the contexts it moves most."""
    from irmlens.mediate.directions import decompose, moved_contexts, read_direction

    fit_tokens, fit_b, fit_r = fit
    d = fit_b.shape[-1]
    mean = (fit_r - fit_b).reshape(-1, d).mean(0)
    tok = ctx.pair.tokenizer
    out = {"norm": float(mean.norm())} | read_direction(rlhf, mean, tok)
    null = ctx.pair.get().get("null")
    if null is not None:
        null_mean = (acts(null, fit_tokens) - fit_b).reshape(-1, d).mean(0)
        cos = torch.nn.functional.cosine_similarity(mean, null_mean, dim=0)
        out["null_cosine"], out["null_norm"] = float(cos), float(null_mean.norm())
        out["null"] = read_direction(rlhf, null_mean, tok)
    if "shared" in bases:
        out["features"] = decompose(
            bases["shared"], mean, fit_b, fit_r, sites["removed"], ("shared", layer)
        )
    tokens, a_b, a_r = measured
    out["contexts"] = moved_contexts(mean, a_b, a_r, tokens, tok)
    return out


def _top_components(ctx, rlhf, layer, bases, curves) -> dict | None:
    """The most compact basis's top 3 components (removed), each read through the output."""
    from irmlens.mediate.curves import component_directions
    from irmlens.mediate.directions import read_direction

    best = _best(curves, curves)
    if best is None:
        return None
    name, curve = best
    dirs = component_directions(bases[name], rlhf.cfg.d_model)
    return {
        "basis": name,
        "components": [
            {"component": r["component"], "share": r["share"], "estimate": r["estimate"]}
            | read_direction(rlhf, dirs[r["component"]], ctx.pair.tokenizer, k=8)
            for r in curve["ranked"][:3]
        ],
    }


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
    if not sweep.get("gain_resolved", True):
        return (
            f"no gain to locate: the RLHF model's {sweep['metric'].replace('_', ' ')} on this text "
            f"is not distinguishable from the base's (95% CI of the gain {sweep['gain_ci'][0]:+.4f} "
            f"to {sweep['gain_ci'][1]:+.4f}), so no share of it is measured."
        )
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

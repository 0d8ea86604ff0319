"""Stage ``validate``: the paper's causal validation of the IRM (``validate/``).

Every registered feature set (``irmlens.validate.sets.SETS``) is ablated in the RLHF model and
steered into the base model as its spec says; every arm samples the same held-out prompts with
the same seed, and the main set is compared prompt by prompt with each control. The crosscoder's
sparse latents and the activation difference lens's direction go through the same arm loop. The
files are written into a temporary folder that replaces ``validate/`` in one rename.
"""

from __future__ import annotations

import time
from pathlib import Path

from irmlens.io import atomic_dir, atomic_write_json, read_json
from irmlens.stages.context import StudyContext, log
from irmlens.validate.arms import (
    Arms,
    arm_name,
    feature_rows,
    log_summary,
    nothing_to_intervene_on,
    plans,
    run_arms,
)
from irmlens.validate.sets import MAIN, Workbench, build_sets, sets_json, sparse_irm


def run(ctx: StudyContext) -> None:
    from irmlens.validate.effects import paper_number, single_feature_effects

    started, v = time.perf_counter(), ctx.cfg.validate
    arms = _arms(ctx)
    inputs = ctx.set_inputs(arms.bench)
    sets = build_sets(inputs)
    raw, rows = arms.baselines()
    if not sets:  # the sparse IRM chose only SAE-error columns
        result = nothing_to_intervene_on(arms, v.steering_scales, sparse_irm(inputs, {})[0], rows)
        return _write(ctx, arms, {}, result | {"seconds": time.perf_counter() - started})
    main = sets[0]
    log(
        f"validate: {len(arms.prompts)} held-out prompts, {len(sets)} feature sets of {main.size}"
        f" features, steering scales {v.steering_scales}"
    )
    plan = plans(v.steering_scales)
    raw |= run_arms(arms, sets, plan)
    set_rows, findings = feature_rows(arms, sets, raw, plan, inputs.matching)
    effects = v.single_feature_effects and single_feature_effects(
        arms, main, raw["rlhf"]["rewards"], v.single_feature_prompts
    )
    crosscoder = _crosscoder(ctx, arms, inputs.irm, raw[arm_name("ablate", MAIN, None)]["rewards"])
    result = arms.header(v.steering_scales, MAIN) | {
        "feature_sets": sets_json(sets),
        "matching": inputs.matching,
        "arms": rows + set_rows,
        "findings": findings,
        "paper": paper_number(arms, main, [rv.text for rv in ctx.splits.heldout], v),
        "single_feature_ablation": effects or [],
        "crosscoder": crosscoder,
        "activation_difference_lens": _lens(ctx, arms, raw, crosscoder),
        "seconds": time.perf_counter() - started,
    }
    _write(ctx, arms, {k: res["rewards"] for k, res in raw.items()}, result)
    log_summary(arms, result)


def _arms(ctx: StudyContext) -> Arms:
    """The models, the studied layers' cached activations, and the held-out prompts every arm
    samples with the reviews its perplexity is measured on."""
    from irmlens.data.corpus import review_prompts

    cfg, v, r = ctx.cfg, ctx.cfg.validate, ctx.cfg.rlhf
    (base, tokenizer), (rlhf, _) = ctx.hf_model("base"), ctx.hf_model("rlhf")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    models = {"base": base, "rlhf": rlhf}
    acts = {m: {la: ctx.activations(m, la) for la in ctx.studied_layers} for m in models}
    heldout = ctx.splits.heldout
    prompts = review_prompts(heldout, v.n_prompts, r.prompt_min_words, r.prompt_max_words, v.seed)
    texts = [rv.text for rv in heldout[: v.perplexity_texts]]
    bench = Workbench(models, tokenizer, acts)
    n, kind, seed = cfg.cache.n_ctx, ctx.hook_kind, v.seed
    return Arms(
        bench, prompts, texts, ctx.rm, r.max_completion_length, n, kind, seed, v.n_bootstrap, log
    )


def _crosscoder(ctx: StudyContext, arms: Arms, irm: dict, sae_main) -> dict | None:
    """The crosscoder section (None without a crosscoder, or with ``validate.crosscoder`` off);
    the null model and its activations are loaded for the crosscoder's lockstep ablation."""
    from irmlens.validate.sections import CrosscoderInputs, crosscoder_section
    from sae_training.crosscoder import load_crosscoder

    cfg, chosen = ctx.cfg, irm.get("crosscoder_sparse")
    if not cfg.validate.crosscoder or not chosen or not (ctx.crosscoder_dir / "cfg.json").exists():
        return None
    cc, ccfg = load_crosscoder(ctx.crosscoder_dir, cfg.model.device)
    names, la, bench = ccfg["models"], ctx.irm_layer, arms.bench
    models = {m: bench.models[m] if m in bench.models else ctx.hf_model(m)[0] for m in names}
    acts = {m: bench.acts[m][la] if m in bench.acts else ctx.activations(m, la) for m in names}
    only = read_json(ctx.paths.diff / "crosscoder.json")["pairs"]["rlhf"]["tuned_only_latents"]
    latents, only = [int(j) for j in chosen["features"]], [int(j) for j in only]
    inputs = CrosscoderInputs(cc, names, models, acts, la, ctx.hook(la), latents, only)
    return crosscoder_section(arms, inputs, sae_main, cfg.validate)


def _lens(ctx: StudyContext, arms: Arms, raw: dict, crosscoder: dict | None) -> dict:
    """The activation difference lens's vector at the IRM layer, steered (no dictionary)."""
    from irmlens.cache.store import load_token_rows
    from irmlens.diff.lens import LENS_FIRST_K, mean_difference
    from irmlens.validate.sections import lens_section

    la, acts, valid = ctx.irm_layer, arms.bench.acts, load_token_rows(ctx.paths.cache).valid
    vector = mean_difference(acts["base"][la], acts["rlhf"][la], valid, LENS_FIRST_K)
    scales = ctx.cfg.validate.steering_scales
    return lens_section(arms, vector, la, ctx.hook(la), LENS_FIRST_K, scales, raw, crosscoder)


def _write(ctx: StudyContext, arms: Arms, rewards: dict, result: dict) -> None:
    per_prompt = {k: [float(x) for x in r] for k, r in rewards.items()}
    with atomic_dir(ctx.paths.validate) as tmp:
        atomic_write_json(tmp / "rewards.json", {"prompts": arms.prompts, "rewards": per_prompt})
        atomic_write_json(tmp / "validation.json", result)


def outputs(paths) -> list[Path]:
    return [paths.validate]


def done(ctx: StudyContext) -> bool:
    return (ctx.paths.validate / "validation.json").exists()

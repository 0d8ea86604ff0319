"""Stage ``validate``: the paper's causal validation of the IRM (``validate/``).

Every registered feature set (``irmlens.validate.sets.SETS``: the sparse IRM's features, their
sign halves, random features matched to them, the random dictionary's sparse selection, the most
divergent features, the reward-logit features and their matched draws) is ablated in the RLHF
model and steered into the base model, its spec saying at which scales. Every arm samples the
same held-out prompts with the same seed and is scored with the reward model; the main set is
compared prompt by prompt with each control. The crosscoder's sparse latents and the activation
difference lens's direction go through the same arm loop. All files are written into a
temporary folder that replaces ``validate/`` in one rename.
"""

from __future__ import annotations

import time
from pathlib import Path

from irmlens.io import atomic_dir, atomic_write_json, read_json
from irmlens.stages.context import StudyContext, log
from irmlens.validate.arms import Arms, arm_name, feature_rows, plans, run_arms, summary_row
from irmlens.validate.sets import MAIN, SetInputs, Workbench, build_sets, sparse_irm
from irmlens.validate.statistics import difference, format_ci, paired_difference_ci


def run(ctx: StudyContext) -> None:
    from irmlens.validate.effects import paper_number, single_feature_effects

    started, v = time.perf_counter(), ctx.cfg.validate
    arms = _arms(ctx)
    inputs = _set_inputs(ctx, arms.bench, read_json(ctx.paths.irm_metrics))
    sets = build_sets(inputs)
    raw = arms.baselines()
    rows = _baseline_rows(arms, raw)
    if not sets:
        return _nothing_to_intervene_on(ctx, inputs, arms, rows, started)
    main = sets[0]
    log(
        f"validate: {len(arms.prompts)} held-out prompts, {len(sets)} feature sets of "
        f"{main.size} features, steering scales {v.steering_scales}"
    )
    gain = paired_difference_ci(
        raw["rlhf"]["rewards"], raw["base"]["rewards"], v.n_bootstrap, v.seed
    )
    rows[1]["rlhf_minus_base"] = difference(gain)
    plan = plans(v.steering_scales)
    raw |= run_arms(arms, sets, plan)
    feature_arm_rows, findings = feature_rows(arms, sets, raw, plan, inputs.matching)
    n = v.paper_prefix_words
    heldout = [rv.text.split() for rv in ctx.splits.heldout]
    prefixes = [" ".join(words[:n]) for words in heldout if len(words) > n]
    crosscoder = _crosscoder(ctx, arms, inputs.irm, raw[arm_name("ablate", MAIN, None)]["rewards"])
    result = _header(ctx, arms) | {
        "feature_sets": {
            fs.name: {
                "description": fs.description,
                "dictionary": fs.dictionary,
                "features": fs.refs(),
                **fs.extra,
            }
            for fs in sets
        },
        "matching": inputs.matching,
        "arms": rows + feature_arm_rows,
        "findings": findings,
        "paper": paper_number(arms, main, prefixes, n),
        "single_feature_ablation": single_feature_effects(
            arms, main, raw["rlhf"]["rewards"], v.single_feature_prompts
        )
        if v.single_feature_effects
        else [],
        "crosscoder": crosscoder,
        "activation_difference_lens": _lens(ctx, arms, raw, crosscoder),
        "seconds": time.perf_counter() - started,
    }
    _write(ctx, arms, {k: res["rewards"] for k, res in raw.items()}, result)
    for f in findings:
        log(f"validate: {f['kind']} vs {f['control']}: {f['mean']:+.3f} {format_ci(f['ci'])}")
    reward = {r["arm"]: r["reward"] for r in result["arms"]}
    log(
        f"validate: reward base {arms.baseline_rewards[0]:.3f}, rlhf {arms.baseline_rewards[1]:.3f}; "
        f"ablating the sparse IRM's features: {reward.get('ablate:' + MAIN, float('nan')):.3f}; "
        f"steering at 1: {reward.get(arm_name('steer', MAIN, 1), float('nan')):.3f}; "
        f"{result['seconds']:.0f} s"
    )


def _arms(ctx: StudyContext) -> Arms:
    """The models, the studied layers' cached activations, and the held-out prompts every arm
    samples with the reviews its perplexity is measured on."""
    from irmlens.cache.store import load_activations
    from irmlens.data.corpus import review_prompts
    from irmlens.models.hooked import load_hf_model

    cfg, v, r = ctx.cfg, ctx.cfg.validate, ctx.cfg.rlhf
    models, tokenizer = {}, None
    for name in ("base", "rlhf"):
        model, tok = load_hf_model(ctx.dirs[name], cfg.model.device, cfg.model.trust_remote_code)
        models[name], tokenizer = model.eval(), tokenizer or tok
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    layers = sorted(ctx.studied_layers)
    acts = {
        m: {la: load_activations(ctx.paths.cache, m, ctx.hook(la)) for la in layers} for m in models
    }
    prompts = review_prompts(
        ctx.splits.heldout, v.n_prompts, r.prompt_min_words, r.prompt_max_words, v.seed
    )
    texts = [rv.text for rv in ctx.splits.heldout[: v.perplexity_texts]]
    return Arms(
        Workbench(models, tokenizer, acts),
        prompts,
        texts,
        ctx.rm,
        r.max_completion_length,
        cfg.cache.n_ctx,
        ctx.hook_kind,
        v.seed,
        v.n_bootstrap,
        log,
    )


def _set_inputs(ctx: StudyContext, bench: Workbench, irm: dict) -> SetInputs:
    """What the set builders read; dictionaries through the basis registry (``ctx.sae``)."""
    divergent = [f["feature"] for f in read_json(ctx.paths.features_json)["divergent_features"]]
    return SetInputs(
        irm,
        divergent,
        sorted(ctx.studied_layers),
        ctx.irm_layer,
        ctx.sae,
        ctx.random_sae,
        ctx.rm.word_utility,
        ctx.cfg.validate,
        bench,
    )


def _baseline_rows(arms: Arms, raw: dict) -> list[dict]:
    base, rlhf = arms.baseline_rewards
    return [
        summary_row(arms, m, "baseline", None, None, raw[m], base, rlhf) for m in ("base", "rlhf")
    ]


def _header(ctx: StudyContext, arms: Arms) -> dict:
    """What every validation.json starts with: the shared set-up and the unintervened rewards."""
    v = ctx.cfg.validate
    return {
        "n_prompts": len(arms.prompts),
        "seed": v.seed,
        "max_new_tokens": arms.max_new_tokens,
        "perplexity_texts": len(arms.texts),
        "steering_scales": list(v.steering_scales),
        "reward_base": arms.baseline_rewards[0],
        "reward_rlhf": arms.baseline_rewards[1],
        "main_arm": MAIN,
    }


def _crosscoder(ctx: StudyContext, arms: Arms, irm: dict, sae_main) -> dict | None:
    """The crosscoder section (None without a crosscoder, or with ``validate.crosscoder`` off);
    the null model and its activations are loaded for the crosscoder's lockstep ablation."""
    from irmlens.cache.store import load_activations
    from irmlens.models.hooked import load_hf_model
    from irmlens.validate.sections import CrosscoderInputs, crosscoder_section
    from sae_training.crosscoder import load_crosscoder

    v, chosen = ctx.cfg.validate, irm.get("crosscoder_sparse")
    if not v.crosscoder or not chosen or not (ctx.crosscoder_dir / "cfg.json").exists():
        return None
    cc, ccfg = load_crosscoder(ctx.crosscoder_dir, ctx.cfg.model.device)
    names, la = ccfg["models"], ctx.irm_layer
    models, acts = dict(arms.bench.models), {}
    for m in names:
        if m not in models:  # the null model
            models[m] = load_hf_model(
                ctx.dirs[m], ctx.cfg.model.device, ctx.cfg.model.trust_remote_code
            )[0].eval()
        acts[m] = (
            arms.bench.acts[m][la]
            if m in arms.bench.acts
            else load_activations(ctx.paths.cache, m, ctx.hook(la))
        )
    rlhf_only = read_json(ctx.paths.diff / "crosscoder.json")["pairs"]["rlhf"]["tuned_only_latents"]
    latents = [int(j) for j in chosen["features"]]
    inputs = CrosscoderInputs(
        cc, names, models, acts, la, ctx.hook(la), latents, [int(j) for j in rlhf_only]
    )
    return crosscoder_section(arms, inputs, sae_main, v)


def _lens(ctx: StudyContext, arms: Arms, raw: dict, crosscoder: dict | None) -> dict:
    """The activation difference lens's vector at the IRM layer, steered (no dictionary)."""
    from irmlens.cache.store import load_token_rows
    from irmlens.diff.lens import LENS_FIRST_K, mean_difference
    from irmlens.validate.sections import lens_section

    la, acts = ctx.irm_layer, arms.bench.acts
    vector = mean_difference(
        acts["base"][la], acts["rlhf"][la], load_token_rows(ctx.paths.cache).valid, LENS_FIRST_K
    )
    scales = ctx.cfg.validate.steering_scales
    return lens_section(arms, vector, la, ctx.hook(la), LENS_FIRST_K, scales, raw, crosscoder)


def _nothing_to_intervene_on(ctx, inputs: SetInputs, arms: Arms, rows: list[dict], started) -> None:
    """The sparse IRM chose only SAE-error columns: no dictionary feature to ablate or steer.
    The unintervened baselines are still measured, and the report says why there is no more."""
    note = "the sparse IRM chose only SAE-error columns (no dictionary feature): there is nothing to ablate or steer"
    log(f"validate: {note}")
    (main,) = sparse_irm(inputs, {})
    result = _header(ctx, arms) | {
        "feature_sets": {
            MAIN: {"description": main.description, "dictionary": "trained", "features": []}
        },
        "matching": {},
        "arms": rows,
        "findings": [],
        "paper": None,
        "single_feature_ablation": [],
        "note": note,
        "seconds": time.perf_counter() - started,
    }
    _write(ctx, arms, {}, result)


def _write(ctx: StudyContext, arms: Arms, rewards: dict, result: dict) -> None:
    per_prompt = {k: [float(x) for x in r] for k, r in rewards.items()}
    with atomic_dir(ctx.paths.validate) as tmp:
        atomic_write_json(tmp / "rewards.json", {"prompts": arms.prompts, "rewards": per_prompt})
        atomic_write_json(tmp / "validation.json", result)


def outputs(paths) -> list[Path]:
    return [paths.validate]


def done(ctx: StudyContext) -> bool:
    return (ctx.paths.validate / "validation.json").exists()

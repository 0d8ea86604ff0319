"""Stage ``validate``: the paper's causal validation of the IRM (``validate/``).

Feature sets of the sparse IRM's size are ablated in the RLHF model (their decoded contributions
subtracted at their layers, at every position of prompt and completion) and steered into the base
model (their mean RLHF-minus-base change added, at each scale of ``validate.steering_scales``).
Every arm samples the same held-out prompts with the same seed, and is scored with the reward
model; the sparse IRM's set (the main arm) is compared prompt by prompt with control sets:

* ``matched_random_<d>``: random features of the same dictionary, matched on firing frequency and
  on the share of activation variance their ablation removes (``validate.n_random_draws`` draws);
* ``random_sae_sparse``: the random dictionary's features that the same sparse selection chose
  (the IRM's random-SAE control, rebuilt from its recorded seeds);
* ``top_divergent``: the most divergent shared-SAE features (the diff stage's label-free ranking);
* ``reward_logit``: features ranked by how far their decoder direction, through the unembedding,
  moves the logits of lexicon words by their utility, times their mean code in the RLHF model (a
  ranking that asks which features carry the reward causally, not which the ridge picked).

All files are written into a temporary folder that replaces ``validate/`` in one rename.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from irmlens.io import atomic_dir, atomic_write_json, read_json
from irmlens.stages.context import StudyContext, log

MAIN = "sparse_irm"


@dataclass
class FeatureSet:
    """A set of dictionary features, possibly over several layers: ``features[layer]`` are
    feature indices of ``saes[layer]``."""

    name: str
    description: str
    saes: dict[int, object]
    features: dict[int, list[int]]
    dictionary: str  # "trained" or "random"
    steer: bool = False  # steered at every scale (the main set); else at scale 1 only
    ablate_only: bool = False  # not steered at all (sign halves, the reward-logit set's matches)
    extra: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(len(f) for f in self.features.values())

    def refs(self) -> list[dict]:
        return [
            {"layer": la, "local_feature": int(j)} for la, fs in self.features.items() for j in fs
        ]


class _Study:
    """What the arms share: models, tokenizer, dictionaries and their statistics."""

    def __init__(self, ctx: StudyContext) -> None:
        from irmlens.cache.store import load_activations
        from irmlens.models.hooked import load_hf_model

        self.ctx, cfg = ctx, ctx.cfg
        self.layers = sorted(ctx.studied_layers)
        self.models, self.tokenizer = {}, None
        for name in ("base", "rlhf"):
            model, tok = load_hf_model(
                ctx.dirs[name], cfg.model.device, cfg.model.trust_remote_code
            )
            self.models[name] = model.eval()
            self.tokenizer = self.tokenizer or tok
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.acts = {
            m: {la: load_activations(ctx.paths.cache, m, ctx.hook(la)) for la in self.layers}
            for m in ("base", "rlhf")
        }
        # (id of an SAE, layer) -> its code statistics; ("codes", id, layer) -> variance codes
        self._stats: dict[tuple, object] = {}

    def stats(self, sae, layer: int) -> dict:
        """Mean codes in both models, the RLHF model's firing frequency, and the mean change."""
        from irmlens.validation import code_statistics

        key = (id(sae), layer)
        if key not in self._stats:
            mb, _ = code_statistics(sae, self.acts["base"][layer])
            mr, fr = code_statistics(sae, self.acts["rlhf"][layer])
            self._stats[key] = {"mean_rlhf": mr, "frequency": fr, "mean_change": mr - mb}
        return self._stats[key]

    def variance_sample(self, layer: int, n: int = 8192) -> torch.Tensor:
        """An evenly spaced sample of the RLHF model's activations (for variance shares)."""
        a = self.acts["rlhf"][layer]
        return a[torch.linspace(0, len(a) - 1, min(n, len(a))).long()]

    def variance_codes(self, sae, layer: int) -> torch.Tensor:
        """``sae``'s codes of ``variance_sample(layer)``, encoded once: every set's removed
        variance, and every candidate set of the matching, is measured on them."""
        key = ("codes", id(sae), layer)
        if key not in self._stats:
            x = self.variance_sample(layer).to(sae.W_dec.device, sae.W_dec.dtype)
            with torch.no_grad():
                self._stats[key] = sae.encode(x)
        return self._stats[key]


def _sparse_sets(ctx: StudyContext, st: _Study, irm: dict) -> list[FeatureSet]:
    """The main arm (the sparse IRM's features) and its halves by the sign of their weight."""
    weights = {
        (f["dictionary"], f["layer"], f["local_feature"]): f["weight"] for f in irm["top_features"]
    }
    groups: dict[str, dict[int, list[int]]] = {"all": {}, "positive": {}, "negative": {}}
    saes: dict[int, object] = {}
    skipped = 0
    for ref in irm["sparse"]["feature_refs"]:
        if ref["dictionary"] == "sae_error":
            skipped += 1  # an SAE-error column is no dictionary feature: nothing to ablate
            continue
        la, j = ref["layer"], ref["local_feature"]
        saes[la] = ctx.sae(ref["dictionary"], la)
        groups["all"].setdefault(la, []).append(j)
        weight = weights.get((ref["dictionary"], la, j))
        if weight is not None and weight != 0:
            groups["positive" if weight > 0 else "negative"].setdefault(la, []).append(j)
    label = next(
        (r["dictionary"] for r in irm["sparse"]["feature_refs"] if r["dictionary"] != "sae_error"),
        "shared",
    )
    sets = [
        FeatureSet(
            MAIN,
            f"the sparse IRM's {irm['sparse']['k']} features ({label} dictionary"
            + (f"; {skipped} SAE-error columns left out" if skipped else "")
            + ")",
            saes,
            groups["all"],
            "trained",
            steer=True,
            extra={"dictionary_label": label},
        )
    ]
    for sign in ("positive", "negative"):
        if groups[sign]:
            sets.append(
                FeatureSet(
                    f"{MAIN}_{sign}",
                    f"the sparse IRM's features with {sign} weight",
                    saes,
                    groups[sign],
                    "trained",
                    ablate_only=True,
                )
            )
    return sets


def _matched_sets(
    ctx: StudyContext, st: _Study, main: FeatureSet, prefix: str = "matched_random"
) -> tuple[list, dict]:
    """Random sets of ``main``'s dictionary, matched per layer on frequency and removed
    variance; draw ``d`` takes each layer's ``d``-th draw."""
    from irmlens.validation import matched_random_sets

    v = ctx.cfg.validate
    per_layer, matching = {}, {}
    for i, (la, feats) in enumerate(main.features.items()):
        sae = main.saes[la]
        target, draws = matched_random_sets(
            sae,
            st.variance_sample(la),
            st.stats(sae, la)["frequency"],
            feats,
            n_draws=v.n_random_draws,
            codes=st.variance_codes(sae, la),
            seed=v.seed + 100 * i + (0 if prefix == "matched_random" else 7),
        )
        per_layer[la] = draws
        matching[str(la)] = {
            "main_removed_variance_share": target,
            "draws_removed_variance_share": [d.removed_share for d in draws],
        }
    sets = [
        FeatureSet(
            f"{prefix}_{d}",
            f"random features of the same dictionary matched to {main.name} on firing frequency "
            f"and on the activation variance their ablation removes (draw {d + 1})",
            main.saes,
            {la: per_layer[la][d].features for la in main.features},
            "trained",
            ablate_only=prefix != "matched_random",
        )
        for d in range(v.n_random_draws)
    ]
    return sets, matching


def _random_sparse_set(st: _Study, irm: dict) -> FeatureSet | None:
    """The random dictionary's features chosen by the sparse selection (recorded by ``irm``)."""
    refs = irm["controls"].get("random_sae_sparse", {}).get("feature_refs")
    if not refs:
        return None  # a run whose irm stage predates the record: rerun ``irmlens irm --force``
    saes, feats = {}, {}
    for ref in refs:
        if ref["dictionary"] == "sae_error":
            continue
        la = ref["layer"]
        saes[la] = st.ctx.random_sae(ref["dictionary"], la, ref["random_seed"])
        feats.setdefault(la, []).append(ref["local_feature"])
    return FeatureSet(
        "random_sae_sparse",
        "the random dictionary's features chosen by the same sparse selection",
        saes,
        feats,
        "random",
    )


def _divergent_set(ctx: StudyContext, st: _Study, k: int) -> FeatureSet:
    top = [f["feature"] for f in read_json(ctx.paths.features_json)["divergent_features"]][:k]
    la = ctx.irm_layer
    return FeatureSet(
        "top_divergent",
        f"the {len(top)} most divergent shared-SAE features of layer {la} (label-free)",
        {la: ctx.sae("shared", la)},
        {la: top},
        "trained",
    )


def _reward_logit_set(ctx: StudyContext, st: _Study, k: int) -> FeatureSet:
    """The ``k`` shared-SAE features (over the studied layers) whose decoder direction pushes
    lexicon words' logits most by their utility, weighted by their mean code in the RLHF model."""
    from irmlens.validation import decoder_directions, reward_logit_scores, token_utilities

    w_u = st.models["rlhf"].get_output_embeddings().weight.detach().T
    utilities = token_utilities(st.tokenizer, ctx.rm.word_utility, w_u.shape[1])
    scored = []
    for la in st.layers:
        sae = ctx.sae("shared", la)
        push = reward_logit_scores(decoder_directions(sae), w_u, utilities)
        push = push.double() * st.stats(sae, la)["mean_rlhf"]
        scored += [(float(push[j]), la, j) for j in range(len(push))]
    scored.sort(reverse=True)
    feats: dict[int, list[int]] = {}
    for _, la, j in scored[:k]:
        feats.setdefault(la, []).append(j)
    return FeatureSet(
        "reward_logit",
        f"the {k} shared-SAE features whose decoder direction most raises rewarded words' "
        "logits over penalised ones (logit lens), times their mean code in the RLHF model",
        {la: ctx.sae("shared", la) for la in feats},
        feats,
        "trained",
        extra={"top_push": [s for s, _, _ in scored[:k]]},
    )


def _ablation_edits(fs: FeatureSet, kind: str) -> dict:
    """Edits at ``(layer, kind)``: the features are of the ``kind`` activations (resid_post or
    mlp_out), and are removed where those are computed."""
    from irmlens.interventions import ablation

    return {(la, kind): ablation(fs.saes[la], f) for la, f in fs.features.items() if f}


def _steering_edits(st: _Study, fs: FeatureSet, scale: float) -> dict:
    from irmlens.interventions import steering, steering_vector

    out = {}
    for la, f in fs.features.items():
        change = st.stats(fs.saes[la], la)["mean_change"].float()
        out[(la, st.ctx.hook_kind)] = steering(steering_vector(fs.saes[la], change, f), scale)
    return out


def _arm(st: _Study, prompts, texts, model: str, edits, seed: int, cfg) -> dict:
    """One arm's generations, reward, KL to the unintervened model and held-out perplexity."""
    from irmlens.validation import generate_and_score, intervention_kl, perplexity

    m = st.models[model]
    gens = generate_and_score(
        m, st.tokenizer, prompts, st.ctx.rm, cfg.rlhf.max_completion_length, seed, edits
    )
    return {
        "rewards": gens.rewards,
        "kl": intervention_kl(m, gens.samples, edits) if edits else 0.0,
        "perplexity": perplexity(m, st.tokenizer, texts, cfg.cache.n_ctx, edits),
        "examples": [
            {"prompt": p, "completion": c}
            for p, c in zip(gens.samples.prompts[:3], gens.samples.completions[:3], strict=True)
        ],
    }


def _summary(name, kind, scale, fs, res, base, rlhf, main, boot, seed) -> dict:
    from irmlens.validation import mean_ci, paired_difference_ci, share_of_gain

    r, lo, hi = mean_ci(res["rewards"], boot, seed)
    row = {
        "arm": name,
        "kind": kind,
        "scale": scale,
        "feature_set": fs.name if fs else None,
        "description": fs.description if fs else None,
        "n_features": fs.size if fs else 0,
        "reward": r,
        "reward_ci": [lo, hi],
        "share_of_gain": share_of_gain(r, base, rlhf, kind)
        if kind in ("ablate", "steer")
        else None,
        "kl_to_unintervened": res["kl"],
        "perplexity": res["perplexity"],
        "examples": res["examples"],
    }
    if main is not None:
        row["main_minus_this"] = _difference(paired_difference_ci(main, res["rewards"], boot, seed))
    return row


def _finding(
    kind: str, control: str, diff: dict, of: str = "the sparse IRM's features", caveat: str = ""
) -> dict:
    """What the paired CI of a set minus a control says, in words (a finding only where it
    excludes 0). Ablation: a lower reward means more of the gain removed; steering: higher.
    ``caveat``: why the comparison is not clean (then it is reported, but not as a finding)."""
    lo, hi = diff["ci"]
    better = hi < 0 if kind == "ablate" else lo > 0
    worse = lo > 0 if kind == "ablate" else hi < 0
    verb = "remove" if kind == "ablate" else "reproduce"
    if better or worse:
        text = f"{of} {verb} {'more' if better else 'less'} of the RLHF gain than {control}"
    else:
        text = f"{of}: no difference from {control} (the paired CI includes 0)"
    if caveat and (better or worse):
        text += f", but {caveat}: not a finding"
    finding = (better or worse) and not caveat
    return {"kind": kind, "control": control, "finding": finding, "text": text} | diff


def _a_control(row: dict) -> bool:
    """A row the main arm is tested against: not the sign halves, not the reward-logit set's
    own matches, and the matched draws together (their mean), not one by one: five separate
    tests would find a difference by chance."""
    name = row["feature_set"]
    if "main_minus_this" not in row or name.startswith((f"{MAIN}_", "reward_logit_matched")):
        return False
    return name == "matched_random_mean" or not name.startswith("matched_random_")


def _strength_caveat(main_row: dict, row: dict) -> str:
    """For an ablation control that removes far more or far less of the activation variance than
    the main set (outside 2/3..3/2 of it), say so: the comparison is then about strength."""
    main, other = main_row.get("removed_variance_share"), row.get("removed_variance_share")
    if not main or not other:
        return ""
    ratio = sum(other.values()) / max(sum(main.values()), 1e-12)
    if 2 / 3 <= ratio <= 3 / 2:
        return ""
    return f"{row['feature_set']} removes {ratio:.2g}x the activation variance the main set removes"


def _match_caveat(matching: dict) -> str:
    """Empty when the matched draws remove, at every layer, between 2/3 and 3/2 of the variance
    the set removes; else what they remove (the control is then weaker or stronger)."""
    ratios = [
        sum(m["draws_removed_variance_share"])
        / len(m["draws_removed_variance_share"])
        / max(m["main_removed_variance_share"], 1e-12)
        for m in matching.values()
    ]
    if all(2 / 3 <= r <= 3 / 2 for r in ratios):
        return ""
    return (
        "its matched draws remove "
        + "-".join(f"{r:.0%}" for r in sorted({min(ratios), max(ratios)}))
        + " of the activation variance it removes (frequency-matched features cannot match it)"
    )


def run(ctx: StudyContext) -> None:
    from irmlens.validation import paired_difference_ci

    started = time.perf_counter()
    cfg, v = ctx.cfg, ctx.cfg.validate
    st = _Study(ctx)
    irm = read_json(ctx.paths.irm_metrics)
    sets = _sparse_sets(ctx, st, irm)
    main = sets[0]
    if main.size == 0:
        return _nothing_to_intervene_on(ctx, st, main, started)
    matched, matching = _matched_sets(ctx, st, main)
    controls = [*matched, _random_sparse_set(st, irm)]
    logit = _reward_logit_set(ctx, st, main.size)
    logit_matched, logit_matching = _matched_sets(ctx, st, logit, "reward_logit_matched")
    matching = {"sparse_irm": matching, "reward_logit": logit_matching}
    controls += [_divergent_set(ctx, st, main.size), logit, *logit_matched]
    controls = [c for c in controls if c is not None and c.size]  # diff.top_n = 0: no divergent
    prompts, texts = _held_out(ctx)
    boot, seed = v.n_bootstrap, v.seed
    log(
        f"validate: {len(prompts)} held-out prompts, {len(sets) + len(controls)} feature sets of "
        f"{main.size} features, steering scales {v.steering_scales}"
    )

    def arm(model, edits):
        return _arm(st, prompts, texts, model, edits, seed, cfg)

    raw, rows = _baselines(ctx, st, prompts, texts)
    r_base, r_rlhf = (float(raw[m]["rewards"].mean()) for m in ("base", "rlhf"))
    secondary: list[dict] = []
    gain = paired_difference_ci(raw["rlhf"]["rewards"], raw["base"]["rewards"], boot, seed)
    rows[1]["rlhf_minus_base"] = _difference(gain)
    findings = []
    plans = [("ablate", "rlhf", None)] + [("steer", "base", s) for s in v.steering_scales]
    for kind, model, scale in plans:
        todo = [fs for fs in [*sets, *controls] if _planned(fs, kind, scale)]
        for fs in todo:
            edits = (
                _ablation_edits(fs, st.ctx.hook_kind)
                if kind == "ablate"
                else _steering_edits(st, fs, scale)
            )
            raw[_arm_name(kind, fs.name, scale)] = arm(model, edits)
        main_rewards = raw[_arm_name(kind, MAIN, scale)]["rewards"]
        for fs in todo:
            row = _summary(
                _arm_name(kind, fs.name, scale),
                kind,
                scale,
                fs,
                raw[_arm_name(kind, fs.name, scale)],
                r_base,
                r_rlhf,
                main_rewards if fs is not main else None,
                boot,
                seed,
            )
            if kind == "ablate":
                row["removed_variance_share"] = _removed_share(st, fs)
            rows.append(row)
        drawn = [raw[_arm_name(kind, fs.name, scale)]["rewards"] for fs in matched if fs in todo]
        if len(drawn) > 1:  # the matched draws together: per prompt, their mean reward
            rows.append(_pooled(kind, scale, drawn, main_rewards, main.size, boot, seed))
        if kind == "ablate":  # the reward-logit set against random features matched to it
            drawn = [raw[_arm_name(kind, fs.name, scale)]["rewards"] for fs in logit_matched]
            row = _pooled(kind, scale, drawn, main_rewards, main.size, boot, seed)
            row["arm"] = row["feature_set"] = "reward_logit_matched_mean"
            d = paired_difference_ci(
                raw[_arm_name(kind, logit.name, scale)]["rewards"],
                torch.stack(drawn).mean(0),
                boot,
                seed,
            )
            row["reward_logit_minus_this"] = _difference(d)
            rows.append(row)
            f = _finding(
                kind,
                "random features matched to them",
                row["reward_logit_minus_this"],
                of="the reward-logit features",
                caveat=_match_caveat(logit_matching),
            )
            secondary = [f | {"control": "reward_logit_matched_mean", "of": "reward_logit"}]
        if scale in (None, 1):
            main_row = next(r for r in rows if r["arm"] == _arm_name(kind, MAIN, scale))
            findings += [
                _finding(
                    kind,
                    row["feature_set"],
                    row["main_minus_this"],
                    caveat=_strength_caveat(main_row, row),
                )
                for row in rows
                if row["kind"] == kind and row["scale"] == scale and _a_control(row)
            ]
    findings += secondary
    paper = _paper_number(ctx, st, main, v, boot)
    effects = _single_feature_effects(st, main, prompts, raw["rlhf"]["rewards"], cfg, v)
    crosscoder = _crosscoder_arms(ctx, st, irm, arm, raw, raw[_arm_name("ablate", MAIN, None)])
    lens = _lens_arms(ctx, st, arm, raw, crosscoder)
    seconds = time.perf_counter() - started
    result = _header(ctx, prompts, texts, r_base, r_rlhf) | {
        "feature_sets": {
            fs.name: {
                "description": fs.description,
                "dictionary": fs.dictionary,
                "features": fs.refs(),
                **fs.extra,
            }
            for fs in [*sets, *controls]
        },
        "matching": matching,
        "arms": rows,
        "findings": findings,
        "paper": paper,
        "single_feature_ablation": effects,
        "crosscoder": crosscoder,
        "activation_difference_lens": lens,
        "seconds": seconds,
    }
    per_prompt = {k: [float(x) for x in res["rewards"]] for k, res in raw.items()}
    with atomic_dir(ctx.paths.validate) as tmp:
        atomic_write_json(tmp / "rewards.json", {"prompts": prompts, "rewards": per_prompt})
        atomic_write_json(tmp / "validation.json", result)
    for f in findings:
        log(f"validate: {f['kind']} vs {f['control']}: {f['mean']:+.3f} {_fmt_ci(f['ci'])}")
    log(
        f"validate: reward base {r_base:.3f}, rlhf {r_rlhf:.3f}; ablating the sparse IRM's "
        f"features: {_row(rows, 'ablate:' + MAIN)['reward']:.3f}; "
        f"steering at 1: {_row(rows, _arm_name('steer', MAIN, 1))['reward']:.3f}; "
        f"{seconds:.0f} s"
    )


def _held_out(ctx: StudyContext) -> tuple[list[str], list[str]]:
    """The held-out prompts every arm samples, and the reviews its perplexity is measured on."""
    from irmlens.data.corpus import review_prompts

    v, r = ctx.cfg.validate, ctx.cfg.rlhf
    prompts = review_prompts(
        ctx.splits.heldout, v.n_prompts, r.prompt_min_words, r.prompt_max_words, v.seed
    )
    return prompts, [rv.text for rv in ctx.splits.heldout[: v.perplexity_texts]]


def _baselines(ctx: StudyContext, st: _Study, prompts, texts) -> tuple[dict, list[dict]]:
    """The unintervened base and RLHF models on the held-out prompts: their raw results and
    their summary rows."""
    v = ctx.cfg.validate
    raw = {m: _arm(st, prompts, texts, m, None, v.seed, ctx.cfg) for m in ("base", "rlhf")}
    r_base, r_rlhf = (float(raw[m]["rewards"].mean()) for m in ("base", "rlhf"))
    rows = [
        _summary(m, "baseline", None, None, raw[m], r_base, r_rlhf, None, v.n_bootstrap, v.seed)
        for m in ("base", "rlhf")
    ]
    return raw, rows


def _header(ctx: StudyContext, prompts, texts, r_base: float, r_rlhf: float) -> dict:
    """What every validation.json starts with: the shared set-up and the unintervened rewards."""
    v = ctx.cfg.validate
    return {
        "n_prompts": len(prompts),
        "seed": v.seed,
        "max_new_tokens": ctx.cfg.rlhf.max_completion_length,
        "perplexity_texts": len(texts),
        "steering_scales": list(v.steering_scales),
        "reward_base": r_base,
        "reward_rlhf": r_rlhf,
        "main_arm": MAIN,
    }


def _nothing_to_intervene_on(ctx: StudyContext, st: _Study, main: FeatureSet, started) -> None:
    """The sparse IRM chose only SAE-error columns: no dictionary feature to ablate or steer.
    The unintervened baselines are still measured, and the report says why there is no more."""
    prompts, texts = _held_out(ctx)
    raw, rows = _baselines(ctx, st, prompts, texts)
    r_base, r_rlhf = (float(raw[m]["rewards"].mean()) for m in ("base", "rlhf"))
    note = (
        "the sparse IRM chose only SAE-error columns (no dictionary feature): there is nothing "
        "to ablate or steer"
    )
    log(f"validate: {note}")
    result = _header(ctx, prompts, texts, r_base, r_rlhf) | {
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
    with atomic_dir(ctx.paths.validate) as tmp:
        atomic_write_json(tmp / "rewards.json", {"prompts": prompts, "rewards": {}})
        atomic_write_json(tmp / "validation.json", result)


def _difference(mean_ci: tuple[float, float, float]) -> dict:
    """A paired difference as report.json holds it: ``{"mean": m, "ci": [low, high]}``."""
    return {"mean": mean_ci[0], "ci": [mean_ci[1], mean_ci[2]]}


def _arm_name(kind: str, set_name: str, scale: float | None) -> str:
    return f"{kind}:{set_name}" + (f"@{scale:g}" if scale is not None else "")


def _planned(fs: FeatureSet, kind: str, scale: float | None) -> bool:
    """Every set is ablated; steering uses the sets marked for every scale, and at scale 1 the
    matched draws too (the sign halves are ablated only)."""
    if kind == "ablate":
        return True
    if fs.ablate_only:
        return False
    return fs.steer or scale == 1


def _pooled(kind, scale, drawn, main_rewards, size, boot, seed) -> dict:
    from irmlens.validation import mean_ci, paired_difference_ci

    pooled = torch.stack(drawn).mean(0)
    m, lo, hi = mean_ci(pooled, boot, seed)
    d = paired_difference_ci(main_rewards, pooled, boot, seed)
    return {
        "arm": _arm_name(kind, "matched_random_mean", scale),
        "kind": kind,
        "scale": scale,
        "feature_set": "matched_random_mean",
        "description": f"the mean over {len(drawn)} matched random draws, prompt by prompt",
        "n_features": size,
        "reward": m,
        "reward_ci": [lo, hi],
        "main_minus_this": _difference(d),
    }


def _fmt_ci(ci) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def _row(rows: list[dict], arm: str) -> dict:
    return next((r for r in rows if r["arm"] == arm), {"reward": float("nan")})


def _removed_share(st: _Study, fs: FeatureSet) -> dict[str, float]:
    from irmlens.interventions import removed_variance_share

    return {
        str(la): removed_variance_share(
            fs.saes[la], st.variance_sample(la), f, codes=st.variance_codes(fs.saes[la], la)
        )
        for la, f in fs.features.items()
    }


def _paper_number(ctx: StudyContext, st: _Study, main: FeatureSet, v, boot: int) -> dict:
    """The paper's own figure: mean reward of the RLHF model's continuations of fixed-length
    prefixes of held-out reviews, before and after ablating the sparse IRM's features."""
    from irmlens.validation import generate_and_score, mean_ci, paired_difference_ci

    n = v.paper_prefix_words
    prefixes = [
        " ".join(rv.text.split()[:n]) for rv in ctx.splits.heldout if len(rv.text.split()) > n
    ]
    if len(prefixes) < 2:  # validate.paper_prefix_words longer than the held-out reviews
        return None
    args = (st.tokenizer, prefixes, ctx.rm, ctx.cfg.rlhf.max_completion_length, v.seed)
    before = generate_and_score(st.models["rlhf"], *args).rewards
    after = generate_and_score(
        st.models["rlhf"], *args, _ablation_edits(main, ctx.hook_kind)
    ).rewards
    b, a, d = (
        mean_ci(before, boot, v.seed),
        mean_ci(after, boot, v.seed),
        paired_difference_ci(after, before, boot, v.seed),
    )
    return {
        "prefix_words": n,
        "n_prefixes": len(prefixes),
        "reward_before": b[0],
        "reward_before_ci": [b[1], b[2]],
        "reward_after": a[0],
        "reward_after_ci": [a[1], a[2]],
        "after_minus_before": _difference(d),
    }


def _single_feature_effects(st: _Study, main: FeatureSet, prompts, rlhf_rewards, cfg, v):
    """Each of the main set's features ablated alone in the RLHF model: its reward change."""
    from irmlens.interventions import ablation
    from irmlens.validation import generate_and_score, paired_difference_ci

    if not v.single_feature_effects:
        return []
    out = []
    n = cfg.rlhf.max_completion_length
    prompts, rlhf_rewards = (
        prompts[: v.single_feature_prompts],
        rlhf_rewards[: v.single_feature_prompts],
    )
    for la, feats in main.features.items():
        for j in feats:
            edits = {(la, st.ctx.hook_kind): ablation(main.saes[la], [j])}
            rewards = generate_and_score(
                st.models["rlhf"], st.tokenizer, prompts, st.ctx.rm, n, v.seed, edits
            ).rewards
            d = paired_difference_ci(rewards, rlhf_rewards, v.n_bootstrap, v.seed)
            out.append(
                {
                    "dictionary": main.extra.get("dictionary_label", "shared"),
                    "layer": la,
                    "local_feature": j,
                    "reward_change": d[0],
                    "ci": [d[1], d[2]],
                }
            )
    return out


def _crosscoder_arms(ctx: StudyContext, st: _Study, irm: dict, arm, raw: dict, sae_main) -> dict:
    """The sparse crosscoder IRM's latents (the IRM's selection on the crosscoder's change
    space) ablated in the RLHF model, with the base and null models run in lockstep so the
    crosscoder reads every model's activation (``irmlens.crosscoder_interventions``), and
    steered into the base model along their tuned-minus-base decoder difference times their mean
    code; beside random latents matched on firing frequency and removed variance (the same
    matching as for SAE features), the RLHF-only latents when there are any, and the sparse
    IRM's SAE arm. None when there is no crosscoder or ``validate.crosscoder`` is off."""
    from irmlens.cache.store import load_activations
    from irmlens.crosscoder_interventions import (
        CrosscoderAblation,
        CrosscoderDifference,
        CrosscoderSide,
        paired_code_statistics,
        paired_codes,
    )
    from irmlens.interventions import steering, steering_vector
    from irmlens.models.hooked import load_hf_model
    from irmlens.validation import matched_random_sets, paired_difference_ci, removed_variance_share
    from sae_training.crosscoder import load_crosscoder

    v, chosen = ctx.cfg.validate, irm.get("crosscoder_sparse")
    if not v.crosscoder or not chosen or not (ctx.crosscoder_dir / "cfg.json").exists():
        return None
    cc, ccfg = load_crosscoder(ctx.crosscoder_dir, ctx.cfg.model.device)
    names, la, kind = ccfg["models"], ctx.irm_layer, ctx.hook_kind
    models = dict(st.models)
    for m in names:
        if m not in models:  # the null model
            models[m] = load_hf_model(
                ctx.dirs[m], ctx.cfg.model.device, ctx.cfg.model.trust_remote_code
            )[0].eval()
    acts = {  # base and rlhf are in st.acts already
        m: st.acts[m][la] if m in st.acts else load_activations(ctx.paths.cache, m, ctx.hook(la))
        for m in names
    }
    mean, frequency = paired_code_statistics(cc, acts, names)
    sample = torch.linspace(0, len(acts["rlhf"]) - 1, min(8192, len(acts["rlhf"]))).long()
    sample_acts = {m: a[sample].float() for m, a in acts.items()}
    codes = paired_codes(cc, sample_acts, names)
    side, diff = CrosscoderSide(cc, names, "rlhf"), CrosscoderDifference(cc, names, "rlhf")
    latents = [int(j) for j in chosen["features"]]
    target, draws = matched_random_sets(
        side,
        sample_acts["rlhf"],
        frequency,
        latents,
        n_draws=v.n_random_draws,
        codes=codes,
        seed=v.seed + 13,
    )
    matching = {
        "main_removed_variance_share": target,
        "draws_removed_variance_share": [x.removed_share for x in draws],
    }
    sets = {"crosscoder_sparse": latents} | {
        f"crosscoder_matched_random_{d}": draw.features for d, draw in enumerate(draws)
    }
    rlhf_only = read_json(ctx.paths.diff / "crosscoder.json")["pairs"]["rlhf"]["tuned_only_latents"]
    if rlhf_only:
        sets["crosscoder_rlhf_only"] = [int(j) for j in rlhf_only]
    companions = {m: models[m] for m in names if m != "rlhf"}
    boot, seed = v.n_bootstrap, v.seed
    r_base, r_rlhf = (float(raw[m]["rewards"].mean()) for m in ("base", "rlhf"))
    rows, rewards = [], {}
    for kind_, model in (("ablate", "rlhf"), ("steer", "base")):
        for name, feats in sets.items():
            if kind_ == "ablate":
                edit = CrosscoderAblation(side, companions, la, kind, feats)
            else:
                edit = steering(steering_vector(diff, mean.float().to(cc.W_dec.device), feats), 1.0)
            res = arm(model, {(la, kind): edit})
            scale = None if kind_ == "ablate" else 1.0
            rewards[_arm_name(kind_, name, scale)] = res["rewards"]
            fs = FeatureSet(name, "", {}, {la: feats}, "crosscoder")
            row = _summary(
                _arm_name(kind_, name, scale),
                kind_,
                scale,
                fs,
                res,
                r_base,
                r_rlhf,
                None,
                boot,
                seed,
            )
            row.pop("description")
            if kind_ == "ablate":
                row["removed_variance_share"] = removed_variance_share(
                    side, sample_acts["rlhf"], feats, codes=codes
                )
            rows.append(row)
    findings = []
    for kind_, scale in (("ablate", None), ("steer", 1.0)):
        main_r = rewards[_arm_name(kind_, "crosscoder_sparse", scale)]
        drawn = torch.stack(
            [
                rewards[_arm_name(kind_, f"crosscoder_matched_random_{d}", scale)]
                for d in range(len(draws))
            ]
        ).mean(0)
        d = _difference(paired_difference_ci(main_r, drawn, boot, seed))
        caveat = "" if kind_ == "steer" else _match_caveat({str(la): matching})
        of = "the sparse crosscoder IRM's latents"
        findings.append(_finding(kind_, "crosscoder_matched_random_mean", d, of=of, caveat=caveat))
        if kind_ == "ablate":  # beside the sparse IRM's SAE features (not a control: a comparison)
            sae_d = _difference(paired_difference_ci(main_r, sae_main["rewards"], boot, seed))
            findings.append(
                _finding(kind_, "the sparse IRM's SAE features", sae_d, of=of)
                | {"comparison": True}
            )
    log(
        "validate: crosscoder "
        + "; ".join(f"{r['arm']} {r['reward']:.3f}" for r in rows if "matched" not in r["arm"])
        + "; "
        + "; ".join(
            f"{f['kind']} vs {f['control']}: {f['mean']:+.3f} {_fmt_ci(f['ci'])}" for f in findings
        )
    )
    return {
        "layer": la,
        "hook": ctx.hook(la),
        "models": names,
        "latents": latents,
        "sets": {k: list(map(int, f)) for k, f in sets.items()},
        "matching": matching,
        "ablation": "h - sum_{j in S} f_j(x) d_j^rlhf in the RLHF model, f read from every "
        "model's activation at the same tokens (the others run in lockstep)",
        "steering": "sum_{j in S} mean(f_j) (d_j^rlhf - d_j^base) added to the base model",
        "arms": rows,
        "findings": findings,
        "rewards": {k: [float(x) for x in r] for k, r in rewards.items()},
    }


def _lens_arms(ctx: StudyContext, st: _Study, arm, raw: dict, crosscoder: dict | None) -> dict:
    """The activation difference lens's steering effect: its vector (the mean RLHF-minus-base
    activation over each cached row's first ``LENS_FIRST_K`` tokens, at the IRM layer: no
    dictionary) added to the base model at each steering scale, beside the sparse IRM's
    steering arm at the same scale (and the crosscoder's at scale 1), paired over prompts."""
    from irmlens.cache.store import load_token_rows
    from irmlens.diff.lens import mean_difference
    from irmlens.interventions import steering
    from irmlens.stages.irm import LENS_FIRST_K
    from irmlens.validation import paired_difference_ci

    v, la = ctx.cfg.validate, ctx.irm_layer
    valid = load_token_rows(ctx.paths.cache).valid
    vector = mean_difference(st.acts["base"][la], st.acts["rlhf"][la], valid, LENS_FIRST_K)
    r_base, r_rlhf = (float(raw[m]["rewards"].mean()) for m in ("base", "rlhf"))
    rows, found = [], []
    for scale in v.steering_scales:
        res = arm("base", {(la, ctx.hook_kind): steering(vector, scale)})
        name = _arm_name("steer", "activation_difference_lens", scale)
        row = _summary(name, "steer", scale, None, res, r_base, r_rlhf, None, v.n_bootstrap, v.seed)
        row["rewards"] = [float(x) for x in res["rewards"]]
        rows.append(row)
        others = [("the sparse IRM's steering", raw.get(_arm_name("steer", MAIN, scale)))]
        if crosscoder and scale == 1:
            cc_key = _arm_name("steer", "crosscoder_sparse", 1.0)
            others.append(("the sparse crosscoder IRM's steering", crosscoder["rewards"][cc_key]))
        for what, other in others:
            if other is None:
                continue
            other = other["rewards"] if isinstance(other, dict) else torch.tensor(other)
            d = _difference(paired_difference_ci(res["rewards"], other, v.n_bootstrap, v.seed))
            found.append(
                _finding("steer", what, d, of="the activation difference lens")
                | {"scale": scale, "comparison": True}
            )
    log(
        "validate: lens steering "
        + ", ".join(f"@{r['scale']:g} {r['reward']:.3f}" for r in rows)
        + f" (base {r_base:.3f}, rlhf {r_rlhf:.3f})"
    )
    return {
        "layer": la,
        "hook": ctx.hook(la),
        "first_k": LENS_FIRST_K,
        "vector_norm": float(vector.norm()),
        "arms": rows,
        "findings": found,
    }


def outputs(paths) -> list[Path]:
    return [paths.validate]


def done(ctx: StudyContext) -> bool:
    return (ctx.paths.validate / "validation.json").exists()

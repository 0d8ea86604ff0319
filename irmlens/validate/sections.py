"""The validation's other bases, through the same arm loop: the crosscoder's latents, and the
activation difference lens's single direction. Each writes its own section of
``validation.json`` (``crosscoder``, ``activation_difference_lens``). Library code: the stage
hands in the models, activations and dictionaries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from irmlens.validate.arms import Arms, Intervention, arm_name, run_arms, summary_row
from irmlens.validate.sets import FeatureSet, SetSpec
from irmlens.validate.statistics import (
    difference,
    finding,
    format_ci,
    match_caveat,
    paired_difference_ci,
)

# how the crosscoder's sets and the lens's direction are intervened on: crosscoder sets ablated
# and steered at scale 1 (their plan has only that scale), the lens steered at every scale
_CROSSCODER_SET = SetSpec("crosscoder", build=lambda inputs, built: [], role="main")
_LENS_SET = SetSpec("activation_difference_lens", lambda i, b: [], role="main", steer="every_scale")


class CrosscoderLatents(Intervention):
    """Crosscoder latents: ablated in the RLHF model with the other models run in lockstep (the
    crosscoder reads every model's activation), steered into the base model along their
    tuned-minus-base decoder difference times their mean code."""

    def __init__(
        self, side, diff, companions: dict, mean: torch.Tensor, hook_kind: str, sample, codes
    ):
        self.side, self.diff, self.companions = side, diff, companions
        self.mean, self.hook_kind, self.sample, self.codes = mean, hook_kind, sample, codes

    def ablation(self, fs, layer, features):
        from irmlens.validate.crosscoder import CrosscoderAblation

        return CrosscoderAblation(self.side, self.companions, layer, self.hook_kind, features)

    def steering_vector(self, fs, layer, features, bench):
        from irmlens.validate.interventions import steering_vector

        return steering_vector(self.diff, self.mean, features)

    def removed_share(self, fs: FeatureSet) -> float:
        """The share of the activation variance ablating ``fs``'s latents removes."""
        from irmlens.validate.interventions import removed_variance_share

        (features,) = fs.features.values()
        return removed_variance_share(self.side, self.sample, features, codes=self.codes)


@dataclass
class CrosscoderInputs:
    """The crosscoder, the names of the models it reads, every one of those models and its
    activations at the crosscoder's layer, the sparse crosscoder IRM's latents and the latents
    stage diff tagged RLHF-only."""

    crosscoder: object
    names: list[str]
    models: dict
    acts: dict[str, torch.Tensor]
    layer: int
    hook: str
    latents: list[int]
    rlhf_only: list[int]


def crosscoder_section(arms: Arms, cc: CrosscoderInputs, sae_main: torch.Tensor, v) -> dict:
    """The sparse crosscoder IRM's latents ablated and steered (scale 1), beside random latents
    matched on firing frequency and removed variance (the same matching as for SAE features),
    the RLHF-only latents when there are any, and the sparse IRM's SAE ablation arm."""
    from irmlens.validate.crosscoder import (
        CrosscoderDifference,
        CrosscoderSide,
        paired_code_statistics,
        paired_codes,
    )
    from irmlens.validate.measures import matched_random_sets

    names, la = cc.names, cc.layer
    mean, frequency = paired_code_statistics(cc.crosscoder, cc.acts, names)
    rlhf = cc.acts["rlhf"]
    sample = torch.linspace(0, len(rlhf) - 1, min(8192, len(rlhf))).long()
    sample_acts = {m: a[sample].float() for m, a in cc.acts.items()}
    codes = paired_codes(cc.crosscoder, sample_acts, names)
    side = CrosscoderSide(cc.crosscoder, names, "rlhf")
    diff = CrosscoderDifference(cc.crosscoder, names, "rlhf")
    target, draws = matched_random_sets(
        side,
        sample_acts["rlhf"],
        frequency,
        cc.latents,
        n_draws=v.n_random_draws,
        codes=codes,
        seed=v.seed + 13,
    )
    matching = {
        "main_removed_variance_share": target,
        "draws_removed_variance_share": [x.removed_share for x in draws],
    }
    drawn = {f"crosscoder_matched_random_{d}": draw.features for d, draw in enumerate(draws)}
    chosen = {"crosscoder_sparse": cc.latents} | drawn
    if cc.rlhf_only:
        chosen["crosscoder_rlhf_only"] = cc.rlhf_only
    sets = [
        FeatureSet(n, "", {la: side}, {la: f}, "crosscoder", _CROSSCODER_SET)
        for n, f in chosen.items()
    ]
    how = CrosscoderLatents(
        side,
        diff,
        {m: cc.models[m] for m in names if m != "rlhf"},
        mean.float().to(cc.crosscoder.W_dec.device),
        arms.hook_kind,
        sample_acts["rlhf"],
        codes,
    )
    plan = [("ablate", "rlhf", None), ("steer", "base", 1.0)]
    raw = run_arms(arms, sets, plan, how)
    r_base, r_rlhf = arms.baseline_rewards
    rows = []
    for kind, _, scale in plan:
        for fs in sets:
            row = summary_row(
                arms,
                arm_name(kind, fs.name, scale),
                kind,
                scale,
                fs,
                raw[arm_name(kind, fs.name, scale)],
                r_base,
                r_rlhf,
            )
            row.pop("description")
            if kind == "ablate":
                row["removed_variance_share"] = how.removed_share(fs)
            rows.append(row)
    findings = _crosscoder_findings(arms, raw, len(draws), matching, la, sae_main)
    arms.log(
        "validate: crosscoder "
        + "; ".join(f"{r['arm']} {r['reward']:.3f}" for r in rows if r["feature_set"] not in drawn)
        + "; "
        + "; ".join(
            f"{f['kind']} vs {f['control']}: {f['mean']:+.3f} {format_ci(f['ci'])}"
            for f in findings
        )
    )
    return {
        "layer": la,
        "hook": cc.hook,
        "models": names,
        "latents": cc.latents,
        "sets": {k: list(map(int, f)) for k, f in chosen.items()},
        "matching": matching,
        "ablation": "h - sum_{j in S} f_j(x) d_j^rlhf in the RLHF model, f read from every "
        "model's activation at the same tokens (the others run in lockstep)",
        "steering": "sum_{j in S} mean(f_j) (d_j^rlhf - d_j^base) added to the base model",
        "arms": rows,
        "findings": findings,
        "rewards": {k: [float(x) for x in r["rewards"]] for k, r in raw.items()},
    }


def _crosscoder_findings(arms: Arms, raw: dict, n_draws: int, matching: dict, la: int, sae_main):
    """The sparse crosscoder IRM's latents against their matched draws (ablation and steering),
    and beside the sparse IRM's SAE features (a comparison, not a control)."""
    boot, seed, out = arms.n_boot, arms.seed, []
    of = "the sparse crosscoder IRM's latents"
    for kind, scale in (("ablate", None), ("steer", 1.0)):
        main_r = raw[arm_name(kind, "crosscoder_sparse", scale)]["rewards"]
        drawn = torch.stack(
            [
                raw[arm_name(kind, f"crosscoder_matched_random_{d}", scale)]["rewards"]
                for d in range(n_draws)
            ]
        ).mean(0)
        d = difference(paired_difference_ci(main_r, drawn, boot, seed))
        caveat = "" if kind == "steer" else match_caveat({str(la): matching})
        out.append(finding(kind, "crosscoder_matched_random_mean", d, of=of, caveat=caveat))
        if kind == "ablate":
            sae_d = difference(paired_difference_ci(main_r, sae_main, boot, seed))
            out.append(
                finding(kind, "the sparse IRM's SAE features", sae_d, of=of) | {"comparison": True}
            )
    return out


class Direction(Intervention):
    """A single direction (no dictionary): steered into the base model as it is."""

    def __init__(self, vector: torch.Tensor) -> None:
        self.vector = vector

    def steering_vector(self, fs, layer, features, bench):
        return self.vector


def lens_section(
    arms: Arms,
    vector: torch.Tensor,
    layer: int,
    hook: str,
    first_k: int,
    scales,
    raw_sae: dict,
    crosscoder: dict | None,
) -> dict:
    """The activation difference lens's vector (the mean RLHF-minus-base activation over each
    cached row's first ``first_k`` tokens) added to the base model at each steering scale, beside
    the sparse IRM's steering arm at the same scale (and the crosscoder's at scale 1), paired
    over prompts."""
    lens = FeatureSet(
        "activation_difference_lens", "", {layer: None}, {layer: [0]}, "direction", _LENS_SET
    )
    raw = run_arms(arms, [lens], [("steer", "base", s) for s in scales], Direction(vector))
    r_base, r_rlhf = arms.baseline_rewards
    rows, found = [], []
    for scale in scales:
        name = arm_name("steer", lens.name, scale)
        res = raw[name]
        row = summary_row(arms, name, "steer", scale, None, res, r_base, r_rlhf)
        row["rewards"] = [float(x) for x in res["rewards"]]
        rows.append(row)
        others = [
            ("the sparse IRM's steering", raw_sae.get(arm_name("steer", "sparse_irm", scale)))
        ]
        if crosscoder and scale == 1:
            cc_rewards = crosscoder["rewards"][arm_name("steer", "crosscoder_sparse", 1.0)]
            others.append(
                ("the sparse crosscoder IRM's steering", {"rewards": torch.tensor(cc_rewards)})
            )
        for what, other in others:
            if other is None:
                continue
            d = difference(
                paired_difference_ci(res["rewards"], other["rewards"], arms.n_boot, arms.seed)
            )
            found.append(
                finding("steer", what, d, of="the activation difference lens")
                | {"scale": scale, "comparison": True}
            )
    arms.log(
        "validate: lens steering "
        + ", ".join(f"@{r['scale']:g} {r['reward']:.3f}" for r in rows)
        + f" (base {r_base:.3f}, rlhf {r_rlhf:.3f})"
    )
    return {
        "layer": layer,
        "hook": hook,
        "first_k": first_k,
        "vector_norm": float(vector.norm()),
        "arms": rows,
        "findings": found,
    }

"""The validation's arms: one loop that intervenes on feature sets (SAE features, crosscoder
latents, a single direction) while the models generate, and the rows and findings read off them.

An *arm* is one feature set, one kind of intervention (``ablate`` in the RLHF model, ``steer``
into the base model at a scale) and its measurements on the held-out prompts: the reward of each
completion, the KL of the intervened model to the unintervened one, held-out perplexity. How a
set is intervened on belongs to its basis (``Intervention``); which arms a set gets and what it
is tested against belong to its spec (``irmlens.validate.sets``). Library code: no run folders.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from irmlens.validate.sets import FeatureSet, Workbench
from irmlens.validate.statistics import (
    difference,
    finding,
    mean_ci,
    paired_difference_ci,
    share_of_gain,
    strength_caveat,
)


class Intervention:
    """How a feature set of SAE features is intervened on at its layers (the default): its
    decoded contributions subtracted (ablation), or its mean RLHF-minus-base change added
    (steering). Other bases subclass it (crosscoder latents, a single direction)."""

    def ablation(self, fs: FeatureSet, layer: int, features: list[int]):
        from irmlens.validate.interventions import ablation

        return ablation(fs.bases[layer], features)

    def steering_vector(self, fs: FeatureSet, layer: int, features: list[int], bench: Workbench):
        from irmlens.validate.interventions import steering_vector

        change = bench.stats(fs.bases[layer], layer)["mean_change"].float()
        return steering_vector(fs.bases[layer], change, features)


SAE_FEATURES = Intervention()


@dataclass
class Arms:
    """The shared set-up of every arm: held-out prompts (sampled with one seed) and perplexity
    texts, the reward model, the hook kind the sets' layers are read at, and bootstrap size."""

    bench: Workbench
    prompts: list[str]
    texts: list[str]
    rm: object
    max_new_tokens: int
    n_ctx: int
    hook_kind: str
    seed: int
    n_boot: int
    log: Callable[[str], None] = print
    baseline_rewards: tuple[float, float] = (float("nan"), float("nan"))  # base, rlhf means

    def measure(self, model: str, edits: dict | None) -> dict:
        """One arm's generations, reward, KL to the unintervened model, held-out perplexity."""
        from irmlens.validate.measures import generate_and_score, intervention_kl, perplexity

        m, tok = self.bench.models[model], self.bench.tokenizer
        gens = generate_and_score(
            m, tok, self.prompts, self.rm, self.max_new_tokens, self.seed, edits
        )
        return {
            "rewards": gens.rewards,
            "kl": intervention_kl(m, gens.samples, edits) if edits else 0.0,
            "perplexity": perplexity(m, tok, self.texts, self.n_ctx, edits),
            "examples": [
                {"prompt": p, "completion": c}
                for p, c in zip(gens.samples.prompts[:3], gens.samples.completions[:3], strict=True)
            ],
        }

    def edits(self, fs: FeatureSet, kind: str, scale: float | None, how: Intervention) -> dict:
        """The set's edits at ``(layer, hook kind)`` for an arm."""
        from irmlens.validate.interventions import steering

        if kind == "ablate":
            return {
                (la, self.hook_kind): how.ablation(fs, la, f) for la, f in fs.features.items() if f
            }
        return {
            (la, self.hook_kind): steering(how.steering_vector(fs, la, f, self.bench), scale)
            for la, f in fs.features.items()
        }

    def baselines(self) -> tuple[dict, list[dict]]:
        """The unintervened base and RLHF models: their results, and their rows (the RLHF row
        with its paired gain over the base). Their mean rewards are kept for every row's share
        of the gain."""
        raw = {m: self.measure(m, None) for m in ("base", "rlhf")}
        self.baseline_rewards = base, rlhf = tuple(
            float(raw[m]["rewards"].mean()) for m in ("base", "rlhf")
        )
        rows = [summary_row(self, m, "baseline", None, None, raw[m], base, rlhf) for m in raw]
        gain = paired_difference_ci(
            raw["rlhf"]["rewards"], raw["base"]["rewards"], self.n_boot, self.seed
        )
        rows[1]["rlhf_minus_base"] = difference(gain)
        return raw, rows

    def header(self, steering_scales: Sequence[float], main: str) -> dict:
        """What every validation.json starts with: the shared set-up and the unintervened
        rewards."""
        return {
            "n_prompts": len(self.prompts),
            "seed": self.seed,
            "max_new_tokens": self.max_new_tokens,
            "perplexity_texts": len(self.texts),
            "steering_scales": list(steering_scales),
            "reward_base": self.baseline_rewards[0],
            "reward_rlhf": self.baseline_rewards[1],
            "main_arm": main,
        }


Plan = tuple[str, str, float | None]  # (kind, model, scale)


def plans(scales: Sequence[float]) -> list[Plan]:
    """Ablation in the RLHF model, then steering into the base model at each scale."""
    return [("ablate", "rlhf", None)] + [("steer", "base", s) for s in scales]


def arm_name(kind: str, set_name: str, scale: float | None) -> str:
    return f"{kind}:{set_name}" + (f"@{scale:g}" if scale is not None else "")


def run_arms(
    arms: Arms, sets: Sequence[FeatureSet], plan: Sequence[Plan], how: Intervention = SAE_FEATURES
) -> dict[str, dict]:
    """The one arm loop: every set its spec plans for each (kind, model, scale), by arm name."""
    raw = {}
    for kind, model, scale in plan:
        for fs in sets:
            if fs.spec.planned(kind, scale):
                raw[arm_name(kind, fs.name, scale)] = arms.measure(
                    model, arms.edits(fs, kind, scale, how)
                )
    return raw


def summary_row(
    arms: Arms, name: str, kind: str, scale, fs: FeatureSet | None, res: dict, base, rlhf
) -> dict:
    """An arm's row in ``validation.json``: reward with its CI, share of the gain, KL, perplexity."""
    r, lo, hi = mean_ci(res["rewards"], arms.n_boot, arms.seed)
    return {
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


def pooled_row(arms: Arms, name: str, kind: str, scale, drawn: list, against: dict) -> dict:
    """Matched draws together: per prompt, their mean reward; each set in ``against`` (name ->
    its rewards) minus it, paired over prompts."""
    pooled = torch.stack(drawn).mean(0)
    m, lo, hi = mean_ci(pooled, arms.n_boot, arms.seed)
    row = {
        "arm": arm_name(kind, name, scale),
        "kind": kind,
        "scale": scale,
        "feature_set": name,
        "description": f"the mean over {len(drawn)} matched random draws, prompt by prompt"
        if len(drawn) > 1
        else "the one matched random draw (validate.n_random_draws = 1)",
        "reward": m,
        "reward_ci": [lo, hi],
    }
    for of, rewards in against.items():
        d = paired_difference_ci(rewards, pooled, arms.n_boot, arms.seed)
        row[f"{'main' if of == 'main' else of}_minus_this"] = difference(d)
    return row


def feature_rows(
    arms: Arms, sets: Sequence[FeatureSet], raw: dict, plan: Sequence[Plan], matching: dict
) -> tuple[list[dict], list[dict]]:
    """The feature sets' rows, plan by plan (each set's arm, then each matched group's pooled
    mean), and the findings: the main set against every tested control at scale 1 (and in
    ablation), then each set against its own matched draws."""
    from irmlens.validate.statistics import match_caveat

    main = next(fs for fs in sets if fs.spec.role == "main")
    r_base, r_rlhf = arms.baseline_rewards
    by_name = {fs.name: fs for fs in sets}
    rows, findings, secondary = [], [], []
    for kind, _, scale in plan:
        main_rewards = raw[arm_name(kind, main.name, scale)]["rewards"]
        planned = [fs for fs in sets if fs.spec.planned(kind, scale)]
        for fs in planned:
            res = raw[arm_name(kind, fs.name, scale)]
            row = summary_row(
                arms, arm_name(kind, fs.name, scale), kind, scale, fs, res, r_base, r_rlhf
            )
            if fs is not main:
                d = paired_difference_ci(main_rewards, res["rewards"], arms.n_boot, arms.seed)
                row["main_minus_this"] = difference(d)
            if kind == "ablate":
                row["removed_variance_share"] = arms.bench.removed_share(fs)
            rows.append(row)
        for spec in dict.fromkeys(fs.spec for fs in planned if fs.spec.matched_to):
            drawn = [
                raw[arm_name(kind, fs.name, scale)]["rewards"] for fs in planned if fs.spec is spec
            ]
            target = by_name[spec.matched_to]
            against = {"main": main_rewards}
            if target is not main:
                against[target.name] = raw[arm_name(kind, target.name, scale)]["rewards"]
            row = pooled_row(arms, spec.pooled, kind, scale, drawn, against)
            row["n_features"] = target.size
            rows.append(row)
            if target is not main and scale in (None, 1):
                f = finding(
                    kind,
                    "random features matched to them",
                    row[f"{target.name}_minus_this"],
                    of=target.spec.of,
                    caveat=match_caveat(matching[target.name]),
                )
                secondary.append(f | {"control": spec.pooled, "of": target.name})
        if scale in (None, 1):
            main_row = next(r for r in rows if r["arm"] == arm_name(kind, main.name, scale))
            findings += [
                finding(
                    kind,
                    row["feature_set"],
                    row["main_minus_this"],
                    of="the sparse IRM's features",
                    caveat=strength_caveat(main_row, row),
                )
                for row in rows
                if row["kind"] == kind and row["scale"] == scale and _tested(row, by_name, main)
            ]
    return rows, findings + secondary


def _tested(row: dict, by_name: dict, main: FeatureSet) -> bool:
    """Does the main set's comparison with this row enter the findings? A control set's row, or
    the pooled mean of draws matched to the main set (by spec, never by name)."""
    if "main_minus_this" not in row:
        return False
    fs = by_name.get(row["feature_set"])
    if fs is not None:
        return fs.spec.tested
    return any(
        f.spec.pooled == row["feature_set"] and f.spec.matched_to == main.name
        for f in by_name.values()
    )


def nothing_to_intervene_on(arms: Arms, scales, main: FeatureSet, rows: list[dict]) -> dict:
    """``validation.json`` when the main set has no dictionary feature (the sparse IRM chose
    only SAE-error columns): the unintervened baselines, and why there is no more."""
    note = (
        "the sparse IRM chose only SAE-error columns (no dictionary feature): there is nothing "
        "to ablate or steer"
    )
    arms.log(f"validate: {note}")
    return arms.header(scales, main.name) | {
        "feature_sets": {
            main.name: {"description": main.description, "dictionary": "trained", "features": []}
        },
        "matching": {},
        "arms": rows,
        "findings": [],
        "paper": None,
        "single_feature_ablation": [],
        "note": note,
    }


def log_summary(arms: Arms, result: dict) -> None:
    """Each finding, and the main arms' rewards beside the unintervened models'."""
    from irmlens.validate.statistics import format_ci

    for f in result["findings"]:
        arms.log(f"validate: {f['kind']} vs {f['control']}: {f['mean']:+.3f} {format_ci(f['ci'])}")
    reward = {r["arm"]: r["reward"] for r in result["arms"]}
    main, nan = result["main_arm"], float("nan")
    arms.log(
        f"validate: reward base {reward['base']:.3f}, rlhf {reward['rlhf']:.3f}; ablating the "
        f"sparse IRM's features: {reward.get(arm_name('ablate', main, None), nan):.3f}; steering "
        f"at 1: {reward.get(arm_name('steer', main, 1), nan):.3f}; {result['seconds']:.0f} s"
    )

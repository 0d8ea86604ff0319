"""The validation's statistics and finding rules, in one place: bootstrap CIs over prompts, the
share of the RLHF gain an arm removes or reproduces, and when a paired difference is a finding.

Every arm samples the same prompts with the same seed, so two arms are compared prompt by prompt
(a paired bootstrap: the prompts' own variance cancels).
"""

from __future__ import annotations

import math

import torch


def mean_ci(
    values: torch.Tensor, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """Mean and percentile bootstrap CI over the items (prompts)."""
    v = torch.as_tensor(values, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(v), (n_boot, len(v)), generator=gen)
    means = v[idx].mean(1)
    a = (1 - level) / 2
    return float(v.mean()), float(means.quantile(a)), float(means.quantile(1 - a))


def paired_difference_ci(
    a: torch.Tensor, b: torch.Tensor, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of ``a - b`` over the same prompts, with its bootstrap CI (prompts resampled once
    for both, so the prompts' own variance cancels)."""
    return mean_ci(torch.as_tensor(a) - torch.as_tensor(b), n_boot, seed)


def share_of_gain(r_arm: float, r_base: float, r_rlhf: float, kind: str) -> float | None:
    """Ablation: the share of the RLHF gain the intervention removes, ``(R_rlhf - R_arm) /
    (R_rlhf - R_base)``; steering: the share it reproduces, ``(R_arm - R_base) / (R_rlhf -
    R_base)``. None when RLHF gained nothing (the ratio would be noise)."""
    gain = r_rlhf - r_base
    if not math.isfinite(gain) or abs(gain) < 1e-9:
        return None
    if kind == "ablate":
        return (r_rlhf - r_arm) / gain
    if kind == "steer":
        return (r_arm - r_base) / gain
    raise ValueError(f"kind {kind!r}: ablate or steer")


def difference(mean_ci_: tuple[float, float, float]) -> dict:
    """A paired difference as report.json holds it: ``{"mean": m, "ci": [low, high]}``."""
    return {"mean": mean_ci_[0], "ci": [mean_ci_[1], mean_ci_[2]]}


def finding(kind: str, control: str, diff: dict, of: str, caveat: str = "") -> dict:
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
    found = (better or worse) and not caveat
    return {"kind": kind, "control": control, "finding": found, "text": text} | diff


def strength_caveat(main_row: dict, row: dict) -> str:
    """For an ablation control that removes far more or far less of the activation variance than
    the main set (outside 2/3..3/2 of it), say so: the comparison is then about strength."""
    main, other = main_row.get("removed_variance_share"), row.get("removed_variance_share")
    if not main or not other:
        return ""
    ratio = sum(other.values()) / max(sum(main.values()), 1e-12)
    if 2 / 3 <= ratio <= 3 / 2:
        return ""
    return f"{row['feature_set']} removes {ratio:.2g}x the activation variance the main set removes"


def match_caveat(matching: dict) -> str:
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


def format_ci(ci) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"

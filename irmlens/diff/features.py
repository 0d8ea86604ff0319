"""Per-feature divergence between the two models, and feature correspondence across dictionaries.

Two ways to put the models' features side by side:
(a) a **shared dictionary** applied to both models' activations on the same tokens: feature j means
    the same direction in both, so its activations can be compared position by position;
(b) **paired dictionaries** (one per model) matched one-to-one by Hungarian matching on decoder
    cosine: the cosine of each matched pair says whether RLHF kept, bent or replaced a feature.
(c) anything else that yields codes for both models on the same positions (a crosscoder, say)
    plugs in through ``FeatureCodes``: the divergence functions take codes, not SAEs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from irmlens.diff.matching import hungarian_match


@dataclass
class FeatureCodes:
    """Feature activations of both models on the same positions ([n_positions, n_features])."""

    base: torch.Tensor
    rlhf: torch.Tensor

    def __post_init__(self) -> None:
        if self.base.shape != self.rlhf.shape:
            raise ValueError(
                f"base and rlhf codes differ in shape: {tuple(self.base.shape)} vs "
                f"{tuple(self.rlhf.shape)}; encode the same positions with the same dictionary"
            )


def feature_divergence(
    codes: FeatureCodes,
    min_frequency: float = 1e-3,
    scale: torch.Tensor | None = None,
    chunk: int = 32768,
) -> dict[str, torch.Tensor]:
    """Per feature: mean activation, firing frequency and mean activation when firing in each
    model, the RMS of the paired code change (``change_rms``), and two scores:

    - ``divergence``: ``change_rms * scale`` — with ``scale`` the decoder row's norm over the
      RMS activation norm, the RMS norm of the change the feature writes, as a fraction of the
      activation's norm. It does not saturate: a feature whose change doubles scores double,
      and a rare feature that flips on a few positions scores little (``scale`` None: code
      units).
    - ``relative_change``: ``change_rms`` over the feature's own RMS level,
      ``sqrt(mean (f_r - f_b)^2) / sqrt(mean (f_r^2 + f_b^2) / 2)``: 0 unchanged, about 1.41
      when it fires in only one model at each position. It saturates (any feature whose firing
      positions move scores near 1.41, RLHF or drift alike), so it describes a feature and
      ranks nothing.

    Features firing on fewer than ``min_frequency`` of positions in both models score 0 (too
    rare to call). Accumulated in float64 over row chunks (memory stays small)."""
    n, d = codes.base.shape
    acc = {
        k: torch.zeros(d, dtype=torch.float64)
        for k in ("sb", "sr", "fb", "fr", "ab", "ar", "ch", "lv")
    }
    for i in range(0, n, chunk):
        b, r = codes.base[i : i + chunk].float(), codes.rlhf[i : i + chunk].float()
        fb, fr = b > 0, r > 0
        acc["sb"] += b.sum(0, dtype=torch.float64)
        acc["sr"] += r.sum(0, dtype=torch.float64)
        acc["fb"] += fb.sum(0, dtype=torch.float64)
        acc["fr"] += fr.sum(0, dtype=torch.float64)
        acc["ab"] += (b * fb).sum(0, dtype=torch.float64)
        acc["ar"] += (r * fr).sum(0, dtype=torch.float64)
        acc["ch"] += ((r - b) ** 2).sum(0, dtype=torch.float64)
        acc["lv"] += ((r**2 + b**2) / 2).sum(0, dtype=torch.float64)
    freq_b, freq_r = acc["fb"] / n, acc["fr"] / n
    rms_change, rms_level = (acc["ch"] / n).sqrt(), (acc["lv"] / n).sqrt()
    scored = torch.maximum(freq_b, freq_r) >= min_frequency
    relative = torch.where(rms_level > 0, rms_change / rms_level.clamp_min(1e-12), 0.0)
    weight = torch.ones(d, dtype=torch.float64) if scale is None else scale.double().cpu()
    return {
        "mean_base": acc["sb"] / n,
        "mean_rlhf": acc["sr"] / n,
        "mean_change": (acc["sr"] - acc["sb"]) / n,
        "frequency_base": freq_b,
        "frequency_rlhf": freq_r,
        "frequency_change": freq_r - freq_b,
        "activation_when_firing_base": acc["ab"] / acc["fb"].clamp_min(1),
        "activation_when_firing_rlhf": acc["ar"] / acc["fr"].clamp_min(1),
        "change_rms": rms_change,
        "relative_change": torch.where(scored, relative, 0.0),
        "divergence": torch.where(scored, rms_change * weight, 0.0),
    }


def divergence_scale(w_dec: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    """``[n_features]``: each decoder row's norm over the RMS norm of ``activations``
    (``[n, d]``), the factor that turns a code change into a fraction of the activation norm."""
    rms = activations.double().pow(2).sum(-1).mean().sqrt().clamp_min(1e-12)
    return w_dec.detach().double().cpu().norm(dim=-1) / rms


def beyond_null(divergence: torch.Tensor, divergence_null: torch.Tensor | None) -> torch.Tensor:
    """The ranking key: each feature's divergence in the RLHF pair minus the null pair's (a
    feature that changes as much under the null fine-tuning is drift, not reward); the RLHF
    divergence itself where the study has no null model."""
    return divergence if divergence_null is None else divergence - divergence_null


def match_dictionaries(
    w_dec_base: torch.Tensor, w_dec_rlhf: torch.Tensor, threshold: float = 0.7
) -> dict:
    """Hungarian matching of two dictionaries' decoder directions (rows), one to one.

    A base feature whose matched partner has cosine >= ``threshold`` is **shared**; below it the
    base feature is **base-only** and its partner **rlhf-only** (RLHF replaced the direction).
    Features left unmatched when the widths differ are base-only / rlhf-only too.
    """
    n_base, n_rlhf = w_dec_base.shape[0], w_dec_rlhf.shape[0]
    rows, cols, matched_cos = hungarian_match(w_dec_base, w_dec_rlhf)
    partner = torch.full((n_base,), -1, dtype=torch.long)
    partner[rows] = cols
    cosine = torch.full((n_base,), float("nan"), dtype=torch.float64)
    cosine[rows] = matched_cos
    shared = cosine >= threshold
    tag_base = ["shared" if s else "base-only" for s in shared.tolist()]
    rlhf_shared = torch.zeros(n_rlhf, dtype=torch.bool)
    rlhf_shared[cols[matched_cos >= threshold]] = True
    quantiles = torch.quantile(matched_cos, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9]).double())
    return {
        "threshold": threshold,
        "partner": partner,
        "cosine": cosine,
        "tag_base": tag_base,
        "n_shared": int(shared.sum()),
        "n_base_only": int((~shared).sum()),
        "n_rlhf_only": int((~rlhf_shared).sum()),
        "cosine_quantiles": dict(
            zip(["p10", "p25", "p50", "p75", "p90"], quantiles.tolist(), strict=True)
        ),
        "cosine_histogram": torch.histogram(matched_cos.float(), bins=20, range=(-1.0, 1.0))[
            0
        ].tolist(),
    }


def shared_feature_partners(
    w_dec_shared: torch.Tensor,
    w_dec_base: torch.Tensor,
    w_dec_rlhf: torch.Tensor,
    threshold: float = 0.7,
) -> dict[str, list]:
    """Where each feature of the shared dictionary lives in the per-model dictionaries: its
    Hungarian partner and decoder cosine in the base SAE and in the RLHF SAE, and a tag —
    ``shared`` (a partner >= ``threshold`` in both), ``rlhf-only`` / ``base-only`` (in one of
    them), ``unmatched`` (in neither)."""
    out: dict[str, list] = {}
    present = {}
    for name, w in (("base", w_dec_base), ("rlhf", w_dec_rlhf)):
        rows, cols, cos = hungarian_match(w_dec_shared, w)
        partner = torch.full((w_dec_shared.shape[0],), -1, dtype=torch.long)
        cosine = torch.full((w_dec_shared.shape[0],), float("nan"), dtype=torch.float64)
        partner[rows], cosine[rows] = cols, cos
        out[f"{name}_partner"] = partner.tolist()
        out[f"{name}_cosine"] = [None if c != c else float(c) for c in cosine.tolist()]
        present[name] = cosine >= threshold
    tags = {(True, True): "shared", (False, True): "rlhf-only", (True, False): "base-only"}
    out["matching_tag"] = [
        tags.get((bool(b), bool(r)), "unmatched")
        for b, r in zip(present["base"], present["rlhf"], strict=True)
    ]
    return out

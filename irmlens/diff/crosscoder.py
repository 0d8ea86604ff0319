"""What a crosscoder's latents say about the models it reads: relative decoder norms (which model
a latent belongs to), decoder cosines, and latent scaling (how much of each latent each model
really uses), after Minder et al., arXiv 2504.02922, and their code (science-of-finetuning
``sparsity-artifacts-crosscoders``: ``tools/latent_scaler/closed_form.py``, ``notebooks/art.py``).

Everything is measured in the crosscoder's own (scaled) space, where each model's activations have
mean norm sqrt(d), so norms compare models on one scale. Pure functions of a
``sae_training.crosscoder.Crosscoder`` and activations; they know nothing of run folders.
"""

from __future__ import annotations

import math

import torch

# relative decoder norm Δ = ½((‖d_tuned‖ − ‖d_base‖) / max(‖d_tuned‖, ‖d_base‖) + 1): 1 when
# only the tuned model's decoder is non-zero, 0 when only the base model's, ½ when equal. The
# tags use the paper's bands (its code: 0.1 on each side, shared within 0.1 of ½).
TUNED_ONLY_MIN = 0.9
BASE_ONLY_MAX = 0.1
SHARED_BAND = 0.1
# latent scaling: a tuned-only latent is "tuned-specific" when the base model's error and
# reconstruction use little of it (the paper's thresholds, notebooks/art.py)
NU_ERROR_MAX = 0.2
NU_RECONSTRUCTION_MAX = 0.5


def relative_norm(cc, base: int = 0, tuned: int = 1) -> torch.Tensor:
    """Δ per latent ``[width]`` between decoder ``base`` and decoder ``tuned``."""
    norms = cc.decoder_norms().detach()
    nb, nt = norms[base], norms[tuned]
    top = torch.maximum(nb, nt).clamp_min(1e-12)
    return 0.5 * ((nt - nb) / top + 1)


def tag_latents(delta: torch.Tensor, fired: torch.Tensor | None = None) -> list[str]:
    """``tuned_only`` / ``base_only`` / ``shared`` / ``other`` per latent from Δ; ``dead`` for
    latents that never fire on the data (``fired``: boolean ``[width]``), whose Δ says nothing."""
    out = []
    for j, v in enumerate(delta.tolist()):
        if fired is not None and not bool(fired[j]):
            out.append("dead")
        elif v >= TUNED_ONLY_MIN:
            out.append("tuned_only")
        elif v <= BASE_ONLY_MAX:
            out.append("base_only")
        elif abs(v - 0.5) < SHARED_BAND:
            out.append("shared")
        else:
            out.append("other")
    return out


def decoder_cosine(cc, base: int = 0, tuned: int = 1) -> torch.Tensor:
    """Cosine between each latent's two decoder vectors ``[width]``."""
    w = cc.W_dec.detach()
    return torch.nn.functional.cosine_similarity(w[base], w[tuned], dim=-1)


def closed_form_beta(
    sum_fy: torch.Tensor, sum_f2: torch.Tensor, vectors: torch.Tensor
) -> torch.Tensor:
    """argmin_β Σ_n ‖y_n − β f_n v‖² per latent: ``vᵀ Σ_n f_n y_n / (‖v‖² Σ_n f_n²)``.

    ``sum_fy`` [J, d] = Σ_n f_nj y_nj, ``sum_f2`` [J], ``vectors`` [J, d]. A latent that never
    fires gets NaN (no data says how much of it a model uses)."""
    num = (sum_fy * vectors).sum(-1)
    den = sum_f2 * vectors.pow(2).sum(-1)
    return torch.where(den > 0, num / den.clamp_min(1e-30), torch.full_like(num, float("nan")))


@torch.no_grad()
def latent_scaling(
    cc, x: torch.Tensor, base: int = 0, tuned: int = 1, batch_size: int = 4096
) -> dict[str, torch.Tensor]:
    """Latent scaling on raw activations ``x`` [n, n_models, d] (aligned positions).

    For every latent j, with v = its *tuned* decoder vector and f_j its code: β fitted to each
    model's reconstruction (``beta_reconstruction_{base,tuned}``) and to each model's error with
    latent j's own contribution put back (``beta_error_*``: y = x − x̂ + f_j d_j^m). Their ratios
    ``nu_error`` = β_error_base / β_error_tuned and ``nu_reconstruction`` (the same for
    reconstructions) are near 0 for a latent only the tuned model uses; a high ``nu_error`` flags
    complete shrinkage (the base's error still holds the latent), a high ``nu_reconstruction``
    latent decoupling (other latents rebuild it in the base)."""
    width, d = cc.width, cc.d_in
    fy = {key: torch.zeros(width, d, dtype=torch.float64) for key in ("rb", "rt", "eb", "et")}
    f2 = torch.zeros(width, dtype=torch.float64)
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        f = cc.encode(xb)
        xs = cc.scale_inputs(xb)
        x_hat = cc.decode_scaled(f)
        fd = f.double()
        f2 += fd.pow(2).sum(0)
        for key, m in (("rb", base), ("rt", tuned)):
            fy[key] += fd.T @ x_hat[:, m].double()
        for key, m in (("eb", base), ("et", tuned)):
            fy[key] += fd.T @ (xs[:, m] - x_hat[:, m]).double()
    w = cc.W_dec.detach().double()
    v = w[tuned]
    # the error target adds f_j d_j^m back: Σ_n f_nj (f_nj d_j^m) = d_j^m Σ_n f_nj²
    fy["eb"] += w[base] * f2[:, None]
    fy["et"] += w[tuned] * f2[:, None]
    out = {
        "beta_reconstruction_base": closed_form_beta(fy["rb"], f2, v),
        "beta_reconstruction_tuned": closed_form_beta(fy["rt"], f2, v),
        "beta_error_base": closed_form_beta(fy["eb"], f2, v),
        "beta_error_tuned": closed_form_beta(fy["et"], f2, v),
    }
    out["nu_error"] = out["beta_error_base"] / out["beta_error_tuned"]
    out["nu_reconstruction"] = out["beta_reconstruction_base"] / out["beta_reconstruction_tuned"]
    return {k: t.float() for k, t in out.items()}


def tuned_specific(delta: torch.Tensor, scaling: dict[str, torch.Tensor]) -> torch.Tensor:
    """Latents tagged tuned-only whose latent scaling confirms it (ν_ε < 0.2 and ν_r < 0.5):
    the ones that are not shrinkage or decoupling artifacts. Boolean ``[width]``."""
    nu_e, nu_r = scaling["nu_error"], scaling["nu_reconstruction"]
    return (
        (delta >= TUNED_ONLY_MIN)
        & (nu_e.abs() < NU_ERROR_MAX)
        & (nu_r.abs() < NU_RECONSTRUCTION_MAX)
        & torch.isfinite(nu_e)
        & torch.isfinite(nu_r)
    )


def _histogram(values: torch.Tensor, bins: int = 20) -> list[int]:
    finite = values[torch.isfinite(values)].clamp(0, 1)
    return torch.histc(finite, bins=bins, min=0.0, max=1.0).long().tolist()


@torch.no_grad()
def pair_summary(cc, x: torch.Tensor, base: int, tuned: int, fired: torch.Tensor) -> dict:
    """Every measure of one (base, tuned) pair of the crosscoder's models, per latent and in
    totals: Δ, tags (live latents only, ``fired``: a dead one is ``dead``), decoder cosine,
    latent scaling and which tuned-only latents it confirms."""
    delta = relative_norm(cc, base, tuned)
    tags = tag_latents(delta, fired)
    scaling = latent_scaling(cc, x, base, tuned)
    confirmed = tuned_specific(delta, scaling) & fired
    counts = {t: tags.count(t) for t in ("tuned_only", "base_only", "shared", "other", "dead")}
    return {
        "tag_counts": counts,
        "n_tuned_specific": int(confirmed.sum()),
        "tuned_only_latents": [j for j, t in enumerate(tags) if t == "tuned_only"],
        "tuned_specific_latents": torch.nonzero(confirmed).flatten().tolist(),
        "relative_norm_histogram": _histogram(delta),
        "relative_norm": [round(v, 5) for v in delta.tolist()],
        "decoder_cosine": [round(v, 5) for v in decoder_cosine(cc, base, tuned).tolist()],
        "nu_error": [_finite_or_none(v) for v in scaling["nu_error"].tolist()],
        "nu_reconstruction": [_finite_or_none(v) for v in scaling["nu_reconstruction"].tolist()],
    }


def _finite_or_none(v: float) -> float | None:
    return round(v, 5) if math.isfinite(v) else None


@torch.no_grad()
def fired_latents(cc, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Boolean ``[width]``: the latents that fire on at least one position of ``x``."""
    fired = torch.zeros(cc.width, dtype=torch.bool)
    for i in range(0, len(x), batch_size):
        fired |= (cc.encode(x[i : i + batch_size]) > 0).any(0).cpu()
    return fired


def crosscoder_diff(cc, x: torch.Tensor, models: list[str], base: str = "base") -> dict:
    """``pair_summary`` of the base against every other model of the crosscoder (``x``: raw
    activations ``[n, n_models, d]`` in ``models``' order), and the thresholds used: the null
    pair's counts say how many "RLHF-only" latents fine-tuning drift alone produces."""
    b = models.index(base)
    fired = fired_latents(cc, x)  # the same for every pair
    return {
        "models": list(models),
        "thresholds": {
            "tuned_only_min": TUNED_ONLY_MIN,
            "base_only_max": BASE_ONLY_MAX,
            "shared_band": SHARED_BAND,
            "nu_error_max": NU_ERROR_MAX,
            "nu_reconstruction_max": NU_RECONSTRUCTION_MAX,
        },
        "pairs": {m: pair_summary(cc, x, b, i, fired) for i, m in enumerate(models) if i != b},
    }

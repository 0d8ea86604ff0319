"""Bases that are not dictionaries: orthonormal frames of the activation space, fitted or not.

Each is an ``OrthonormalBasis`` (``encode(x) = (x - center) Q^T``, ``decode(c) = c Q + center``),
so it follows the basis protocol of ``irmlens.bases`` and its error term (``x - decode(encode(x))``)
is what lies outside its span. They are the yardsticks a dictionary is measured against when asking
in which basis the RLHF change is compact (issue 30):

* ``standard_basis``: the neurons (the residual stream's own coordinates);
* ``random_orthonormal``: a random rotation (what any basis gives);
* ``pca_of_differences``: principal directions of the RLHF − base differences, by variance;
* ``mean_difference_basis``: the mean difference's direction first, then its orthogonal complement.

The fitted ones must be fitted on rows disjoint from the rows a curve is measured on. Pure
functions of tensors: no run folders.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class _Size:
    d_sae: int


class OrthonormalBasis:
    """Rows of ``directions`` ([k, d], orthonormal) as components, around ``center`` ([d])."""

    def __init__(self, directions: torch.Tensor, center: torch.Tensor | None = None) -> None:
        self.W_dec = directions.float()
        d = self.W_dec.shape[1]
        self.center = torch.zeros(d) if center is None else center.float()
        self.cfg = _Size(int(self.W_dec.shape[0]))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.center) @ self.W_dec.T

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes @ self.W_dec + self.center


def standard_basis(d_model: int) -> OrthonormalBasis:
    """The activation space's own coordinates (each neuron of the residual stream a component)."""
    return OrthonormalBasis(torch.eye(d_model))


def random_orthonormal(d_model: int, seed: int) -> OrthonormalBasis:
    """A random rotation of the standard basis (Haar-distributed, seeded)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d_model, d_model, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))  # the sign convention that makes the QR unique
    return OrthonormalBasis(q.T.float())


def pca_of_differences(base: torch.Tensor, rlhf: torch.Tensor) -> OrthonormalBasis:
    """Every principal direction of ``rlhf - base`` ([n, d] paired activations), by explained
    variance (uncentred: the mean difference counts, as it is part of what RLHF changed)."""
    diff = (rlhf.double() - base.double()).reshape(-1, base.shape[-1])
    _, _, vh = torch.linalg.svd(diff, full_matrices=True)
    return OrthonormalBasis(_signed(vh, diff).float())


def mean_difference_basis(base: torch.Tensor, rlhf: torch.Tensor) -> OrthonormalBasis:
    """The mean RLHF − base difference's direction as the first component, then an orthonormal
    basis of its complement (the mean difference holds one direction; the rest is the error)."""
    diff = (rlhf.double() - base.double()).reshape(-1, base.shape[-1])
    mean = diff.mean(0)
    d = mean.shape[0]
    first = mean / mean.norm().clamp_min(1e-12)
    q, _ = torch.linalg.qr(torch.cat([first[:, None], torch.eye(d, dtype=torch.float64)], dim=1))
    q = q[:, :d]
    q[:, 0] = first  # QR may flip its sign: keep the mean's
    return OrthonormalBasis(q.T.float())


def _signed(vh: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
    """Each direction oriented along the mean difference (a deterministic sign)."""
    sign = torch.sign(vh @ diff.mean(0))
    sign[sign == 0] = 1
    return vh * sign[:, None]


def codes(basis, x: torch.Tensor) -> torch.Tensor:
    """``[..., n]``: the basis's codes of activations ``[..., d]`` (on the CPU, float32)."""
    with torch.no_grad():
        flat = x.reshape(-1, x.shape[-1]).to(basis.W_dec.device, basis.W_dec.dtype)
        return basis.encode(flat).float().cpu().reshape(*x.shape[:-1], -1)


class DifferenceBasis:
    """A dictionary trained on RLHF - base activation *differences* (science-of-finetuning's
    diffing toolkit trains such SAEs), read as a basis of the change: a component's change
    between the models is its code of ``rlhf - base`` (``changes``), not the difference of
    its codes of each model's activations, which it was never trained on. Its decoder rows are
    its directions, as any SAE's."""

    def __init__(self, sae) -> None:
        self.sae = sae
        self.W_dec = sae.W_dec
        self.cfg = sae.cfg

    def changes(self, base: torch.Tensor, rlhf: torch.Tensor) -> torch.Tensor:
        """``[..., n]``: each component's change, its code of ``rlhf - base``."""
        return codes(self, rlhf.float() - base.float())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.sae.encode(x)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.sae.decode(codes)


class CrosscoderChangeBasis:
    """A crosscoder read as a basis of the RLHF model's change at fixed positions: latent j's
    change is what the joint code reads differently because the RLHF slot moved away from the
    base (``CrosscoderReading.change``: the codes of every model's activations minus the codes
    with the RLHF slot given the base's), written along the latent's RLHF decoder row (in the raw
    space). Summed over latents it is the change of the crosscoder's RLHF reconstruction, close
    to ``rlhf - base`` where the crosscoder reconstructs well. The other models' activations
    (``others``: e.g. the null model's) are those of the same positions the changes are read at
    (a joint code needs every slot)."""

    def __init__(self, reading, others: dict[str, torch.Tensor], model: str = "rlhf") -> None:
        cc = reading.crosscoder
        slot = reading.models.index(model)
        rows = cc.W_dec[slot] / cc.input_scale[slot]
        if reading.latents is not None:
            rows = rows[reading.latents]
        self.reading, self.others, self.model = reading, others, model
        self.W_dec = rows.detach().float().cpu()
        self.cfg = reading.cfg

    def changes(self, base: torch.Tensor, rlhf: torch.Tensor) -> torch.Tensor:
        """``[..., n]``: each latent's change at the positions of ``others``."""
        d = base.shape[-1]
        acts = {"base": base.reshape(-1, d).float(), self.model: rlhf.reshape(-1, d).float()}
        for name, x in self.others.items():
            if x.shape != base.shape:
                raise ValueError(
                    f"{name}'s activations {tuple(x.shape)} do not sit at the same "
                    f"positions as the changes read ({tuple(base.shape)})"
                )
            acts[name] = x.reshape(-1, d).float()
        return self.reading.change(acts, self.model).reshape(*base.shape[:-1], -1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.float() @ self.W_dec

"""Feature spaces an IRM can be fitted in, all built on the same fit/held-out positions.

The paper fits the IRM on post-ReLU SAE codes. RLHF also moves features *below* their firing
threshold, which post-ReLU codes cannot show, and the SAE's reconstruction error carries whatever
the dictionary missed. Each space here is one answer to "which representation of the change keeps
the implicit reward?"; the pipeline fits the same ridge in each and reports them side by side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sae_training.train import encode_batched

SAE_KINDS = ("codes", "pre", "codes+error")


@dataclass
class FeatureSpace:
    name: str
    description: str
    fit: torch.Tensor  # [n_fit_positions, d]
    held: torch.Tensor  # [n_heldout_positions, d]
    n_features: int  # leading columns that are dictionary features (the rest: error dims etc.)
    selectable: bool = True  # a candidate for the default IRM (controls and references are not)


@torch.no_grad()
def sae_representation(sae, acts: torch.Tensor, kind: str) -> torch.Tensor:
    """Codes (post-nonlinearity), encoder pre-activations, or codes followed by the SAE error."""
    if kind == "pre":
        return encode_batched(sae, acts, pre_activation=True)
    codes = encode_batched(sae, acts)
    if kind == "codes":
        return codes
    if kind == "codes+error":
        recon = torch.cat(
            [sae.decode(codes[i : i + 8192]).cpu() for i in range(0, len(codes), 8192)]
        )
        return torch.cat([codes, acts - recon], dim=1)
    raise ValueError(f"SAE representation {kind!r}; choose one of {SAE_KINDS}")


def difference_space(
    name: str,
    description: str,
    saes: Sequence,
    base: Sequence[torch.Tensor],
    rlhf: Sequence[torch.Tensor] | None,
    positions: tuple[torch.Tensor, torch.Tensor],
    kind: str,
    selectable: bool = True,
) -> FeatureSpace:
    """``rep(rlhf) - rep(base)`` (or ``rep(base)`` alone when ``rlhf`` is None), one SAE per layer,
    layers concatenated; ``saes`` may hold ``None`` for the raw activations."""
    parts = {"fit": [], "held": []}
    n_features = 0
    for i, sae in enumerate(saes):
        for key, p in zip(("fit", "held"), positions, strict=True):
            rep_b = base[i][p] if sae is None else sae_representation(sae, base[i][p], kind)
            if rlhf is None:
                parts[key].append(rep_b)
            else:
                rep_r = rlhf[i][p] if sae is None else sae_representation(sae, rlhf[i][p], kind)
                parts[key].append(rep_r - rep_b)
        n_features += base[i].shape[1] if sae is None else sae.cfg.d_sae
    fit, held = torch.cat(parts["fit"], dim=1), torch.cat(parts["held"], dim=1)
    if kind == "codes+error" and len(saes) > 1:
        raise ValueError("codes+error spaces are built for one layer at a time")
    return FeatureSpace(name, description, fit, held, n_features, selectable)

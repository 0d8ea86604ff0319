"""Layer divergence (the paper's): per layer, the sum over its parameters of ||theta_rlhf - theta_base||_F."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch

from irmlens.errors import ModelPairError

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


@dataclass(frozen=True)
class LayerDivergence:
    layer: int
    divergence: float  # sum of Frobenius norms of parameter deltas in this block
    relative_divergence: float  # divergence / sum of Frobenius norms of the base parameters

    def to_dict(self) -> dict:
        return asdict(self)


def layer_divergence(
    base_state: Mapping[str, torch.Tensor], rlhf_state: Mapping[str, torch.Tensor]
) -> list[LayerDivergence]:
    """Divergence of every transformer block, from two TransformerLens-style parameter dicts.

    Pass parameters (``dict(model.named_parameters())``), not ``state_dict()``: buffers such as the
    attention mask's -inf fill are not weights.
    """
    if set(base_state) != set(rlhf_state):
        missing = sorted(set(base_state) ^ set(rlhf_state))[:5]
        raise ModelPairError(
            f"the two models have different parameters (e.g. {missing}): not a pair"
        )
    delta: dict[int, float] = {}
    norm: dict[int, float] = {}
    for name, base in base_state.items():
        m = _BLOCK.match(name)
        if m is None or not torch.is_floating_point(base):
            continue
        other = rlhf_state[name].detach()
        base = base.detach()
        if other.shape != base.shape:
            raise ModelPairError(f"{name} has shape {tuple(base.shape)} vs {tuple(other.shape)}")
        layer = int(m.group(1))
        delta[layer] = delta.get(layer, 0.0) + float(
            torch.linalg.vector_norm((other - base).double())
        )
        norm[layer] = norm.get(layer, 0.0) + float(torch.linalg.vector_norm(base.double()))
    return [
        LayerDivergence(
            layer, delta[layer], delta[layer] / norm[layer] if norm[layer] > 0 else math.nan
        )
        for layer in sorted(delta)
    ]


def select_layers(
    divergences: list[LayerDivergence], top_k: int, relative: bool = True
) -> list[int]:
    """The ``top_k`` most changed layers (by relative divergence unless ``relative=False``), ascending."""
    key = (lambda d: d.relative_divergence) if relative else (lambda d: d.divergence)
    ranked = sorted(divergences, key=key, reverse=True)
    return sorted(d.layer for d in ranked[:top_k])

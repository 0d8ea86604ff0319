import pytest
import torch

from irmlens.diff.layers import layer_divergence, select_layers
from irmlens.errors import ModelPairError


def _state(seed):
    g = torch.Generator().manual_seed(seed)
    return {f"blocks.{i}.w": torch.randn(4, 4, generator=g) for i in range(3)} | {
        "embed.W_E": torch.randn(5, 4)
    }


def test_identical_models_have_zero_divergence():
    s = _state(0)
    divs = layer_divergence(s, {k: v.clone() for k, v in s.items()})
    assert [d.layer for d in divs] == [0, 1, 2]
    assert all(d.divergence == 0.0 and d.relative_divergence == 0.0 for d in divs)


def test_known_delta_and_selection():
    base = _state(0)
    rlhf = {k: v.clone() for k, v in base.items()}
    rlhf["blocks.2.w"] += 0.5  # ||delta||_F = 0.5 * 4
    rlhf["blocks.0.w"] += 0.1
    divs = layer_divergence(base, rlhf)
    assert divs[2].divergence == pytest.approx(2.0)
    assert divs[2].relative_divergence == pytest.approx(2.0 / float(base["blocks.2.w"].norm()))
    assert divs[1].divergence == 0.0
    assert select_layers(divs, 1) == [2]
    assert select_layers(divs, 2) == [0, 2]


def test_mismatched_shapes_are_refused():
    base = _state(0)
    other = dict(base)
    other["blocks.1.w"] = torch.zeros(4, 5)
    with pytest.raises(ModelPairError):
        layer_divergence(base, other)

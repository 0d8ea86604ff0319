import math

import pytest
import torch

from irmlens.diff.features import FeatureCodes, feature_divergence, match_dictionaries


def test_divergence_is_zero_for_identical_codes_and_sqrt2_for_disjoint_firing():
    g = torch.Generator().manual_seed(0)
    base = torch.relu(torch.randn(5000, 6, generator=g))
    rlhf = base.clone()
    # feature 1: fires in exactly one model at each position
    on = torch.rand(5000, generator=g) < 0.5
    base[:, 1] = torch.where(on, 1.0, 0.0)
    rlhf[:, 1] = torch.where(on, 0.0, 1.0)
    # feature 2: doubled activation -> RMS change / RMS level = 1 / sqrt(2.5)
    rlhf[:, 2] = 2 * base[:, 2]
    # feature 3: too rare to call (fires on 2 of 5000 positions)
    base[:, 3] = 0.0
    rlhf[:, 3] = 0.0
    rlhf[:2, 3] = 5.0
    d = feature_divergence(FeatureCodes(base, rlhf), min_frequency=1e-3, chunk=700)
    assert d["divergence"][0] == 0 and d["divergence"][4] == 0
    assert d["divergence"][1].item() == pytest.approx(math.sqrt(2), rel=1e-6)
    assert d["divergence"][2].item() == pytest.approx(1 / math.sqrt(2.5), rel=1e-6)
    assert d["divergence"][3] == 0
    assert d["mean_change"][2].item() == pytest.approx(base[:, 2].double().mean().item(), rel=1e-6)
    fired = base[:, 2] > 0
    assert d["activation_when_firing_rlhf"][2].item() == pytest.approx(
        2 * base[fired, 2].double().mean().item(), rel=1e-6
    )
    assert d["frequency_rlhf"][3].item() == pytest.approx(2 / 5000)


def test_codes_of_different_shapes_are_refused():
    with pytest.raises(ValueError, match="same dictionary"):
        FeatureCodes(torch.zeros(3, 4), torch.zeros(3, 5))


def test_matching_recovers_a_permutation_and_tags_replaced_features():
    g = torch.Generator().manual_seed(0)
    w_base = torch.randn(40, 16, generator=g)
    perm = torch.randperm(40, generator=g)
    w_rlhf = w_base[perm] * 3.0  # same directions, other order and scale
    w_rlhf[perm == 7] = torch.randn(1, 16, generator=g)  # RLHF replaced base feature 7
    m = match_dictionaries(w_base, w_rlhf, threshold=0.7)
    expected = torch.argsort(perm)  # base feature i sits at rlhf row expected[i]
    keep = torch.arange(40) != 7
    assert torch.equal(m["partner"][keep], expected[keep])
    assert m["tag_base"][7] == "base-only" and m["tag_base"].count("shared") == 39
    assert m["n_shared"] == 39 and m["n_base_only"] == 1 and m["n_rlhf_only"] == 1
    assert sum(m["cosine_histogram"]) == 40


def test_shared_features_are_tagged_by_where_they_live():
    from irmlens.diff.features import shared_feature_partners

    g = torch.Generator().manual_seed(0)
    shared = torch.randn(6, 32, generator=g)
    other = torch.randn(6, 32, generator=g)  # directions in neither per-model dictionary
    base = torch.cat([shared[:4], other[:2]])  # base has shared features 0-3
    rlhf = torch.cat([shared[[0, 1, 4]], other[2:5]])  # rlhf has 0, 1 and 4
    p = shared_feature_partners(shared, base, rlhf, threshold=0.9)
    assert p["matching_tag"] == [
        "shared",
        "shared",
        "base-only",
        "base-only",
        "rlhf-only",
        "unmatched",
    ]
    assert p["base_partner"][:4] == [0, 1, 2, 3] and p["rlhf_partner"][4] == 2
    assert p["base_cosine"][0] == pytest.approx(1.0)

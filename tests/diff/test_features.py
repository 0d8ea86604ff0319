import math

import pytest
import torch

from irmlens.diff.features import (
    FeatureCodes,
    beyond_null,
    divergence_scale,
    feature_divergence,
    match_dictionaries,
)


def test_relative_change_is_zero_for_identical_codes_and_sqrt2_for_disjoint_firing():
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
    rel = d["relative_change"]
    assert rel[0] == 0 and rel[4] == 0
    assert rel[1].item() == pytest.approx(math.sqrt(2), rel=1e-6)
    assert rel[2].item() == pytest.approx(1 / math.sqrt(2.5), rel=1e-6)
    assert rel[3] == 0 and d["divergence"][3] == 0  # too rare: not scored
    # the divergence is the RMS change itself (code units without a scale): 1 for feature 1
    assert d["divergence"][1].item() == pytest.approx(1.0, rel=1e-6)
    assert d["mean_change"][2].item() == pytest.approx(base[:, 2].double().mean().item(), rel=1e-6)
    fired = base[:, 2] > 0
    assert d["activation_when_firing_rlhf"][2].item() == pytest.approx(
        2 * base[fired, 2].double().mean().item(), rel=1e-6
    )
    assert d["frequency_rlhf"][3].item() == pytest.approx(2 / 5000)


def test_a_planted_change_ranks_first_and_drift_in_both_pairs_scores_nothing():
    """Feature 0 changes only under RLHF (planted); feature 1 changes more, but as much under the
    null fine-tuning (drift); feature 2 fires on only a few positions and flips there (it
    saturates the relative change). The divergence does not saturate, and the ranking beyond
    the null pair puts the planted feature first and scores the drift 0."""
    g = torch.Generator().manual_seed(0)
    n = 4000
    base = torch.relu(torch.randn(n, 4, generator=g)) + 0.1
    rlhf, null = base.clone(), base.clone()
    rlhf[:, 0] += 0.5  # planted: RLHF only
    drift = torch.relu(torch.randn(n, generator=g))
    rlhf[:, 1] += drift
    null[:, 1] += drift  # the same change in both pairs
    base[:, 2] = 0.0
    rlhf[:, 2], null[:, 2] = 0.0, 0.0
    base[:40, 2] = 0.3  # fires on 1% of positions, only in the base model
    w_dec = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 3.0]])
    scale = divergence_scale(w_dec, torch.randn(n, 2, generator=g))
    div = feature_divergence(FeatureCodes(base, rlhf), scale=scale)
    div_null = feature_divergence(FeatureCodes(base, null), scale=scale)
    # the rare flip saturates the relative change but has the smallest divergence
    assert div["relative_change"][2] == pytest.approx(math.sqrt(2), rel=1e-6)
    assert div["divergence"][2] < div["divergence"][0] < div["divergence"][1]
    # doubling a change doubles the divergence (no ceiling)
    rlhf2 = rlhf.clone()
    rlhf2[:, 0] += 0.5
    doubled = feature_divergence(FeatureCodes(base, rlhf2), scale=scale)["divergence"][0]
    assert doubled.item() == pytest.approx(2 * div["divergence"][0].item(), rel=1e-6)
    # scaled by the decoder norm over the activations' RMS norm (~sqrt 2 here)
    assert div["divergence"][0].item() == pytest.approx(0.5 / math.sqrt(2), rel=0.05)
    key = beyond_null(div["divergence"], div_null["divergence"])
    assert torch.argsort(key, descending=True).tolist()[0] == 0
    assert key[1] == 0 and div_null["divergence"][1] == div["divergence"][1]
    assert torch.equal(beyond_null(div["divergence"], None), div["divergence"])


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


def test_context_tokens_keep_the_spaces_the_text_has():
    """A word-level tokenizer's tokens decoded alone lose the spaces between words (the cards
    printed "mainactorsahealthy"); ``token_pieces`` keeps each token as it reads in the text."""
    from irmlens.diff.cards import token_pieces, top_contexts
    from irmlens.models.pretrain import train_tokenizer

    text = "the acting is good and the plot is great"
    tok = train_tokenizer([text] * 20, 50, kind="word")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = token_pieces(tok, ids)
    assert "".join(pieces) == tok.decode(ids) and len(pieces) == len(ids)
    assert pieces[1].startswith(" ") and pieces[1].strip() == "acting"
    # in a card's context: the peak token and its neighbours, with their spaces
    tokens = torch.tensor([ids])
    valid = torch.ones_like(tokens, dtype=torch.bool)
    codes = torch.zeros(len(ids), 1)
    codes[3, 0] = 2.0  # "good"
    (ctx,) = top_contexts(
        codes,
        tokens,
        valid,
        lambda i: tok.decode([i]),
        0,
        k=1,
        window_text=lambda w: token_pieces(tok, w),
    )
    assert ctx["tokens"][ctx["focus"]] == " good" and "".join(ctx["tokens"]).startswith(
        "the acting"
    )


def test_quantile_samples_cover_each_band_of_the_firings_in_order():
    """A feature firing at 1..100 on 100 of 200 positions: four bands of 25 firings each, their
    ranges 1-25, 26-50, 51-75, 76-100; each band's samples lie inside it (the top contexts
    alone would show only 96-100)."""
    from irmlens.diff.cards import quantile_contexts

    tokens = torch.arange(200).reshape(4, 50)
    valid = torch.ones_like(tokens, dtype=torch.bool)
    valid[:, 0] = False  # BOS: not a code row
    codes = torch.zeros(int(valid.sum()), 1)
    firing = torch.randperm(len(codes), generator=torch.Generator().manual_seed(0))[:100]
    codes[firing, 0] = torch.arange(1, 101, dtype=torch.float)
    bands = quantile_contexts(codes, tokens, valid, str, 0, bands=4, per_band=2)
    assert [b["band"] for b in bands] == ["0-25%", "25-50%", "50-75%", "75-100%"]
    assert [(b["low"], b["high"]) for b in bands] == [(1, 25), (26, 50), (51, 75), (76, 100)]
    for b in bands:
        assert len(b["contexts"]) == 2
        for c in b["contexts"]:
            assert b["low"] <= c["max"] <= b["high"]
            assert c["activations"][c["focus"]] == c["max"]  # the peak is the sampled position
    assert quantile_contexts(torch.zeros_like(codes), tokens, valid, str, 0) == []

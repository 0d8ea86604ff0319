"""Causal validation helpers: paired rewards, CIs, shares of the RLHF gain, matched controls."""

import pytest
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel

from irmlens.rewards.lexicon import LexiconRewardModel
from irmlens.validate.interventions import ablation, removed_variance_share, steering
from irmlens.validate.measures import (
    generate_and_score,
    intervention_kl,
    matched_random_sets,
)
from irmlens.validate.statistics import mean_ci, paired_difference_ci, share_of_gain
from sae_training.train import random_sae


def test_shares_of_the_rlhf_gain():
    assert share_of_gain(0.5, 0.0, 1.0, "ablate") == pytest.approx(0.5)  # half the gain gone
    assert share_of_gain(1.0, 0.0, 1.0, "ablate") == 0.0
    assert share_of_gain(0.25, 0.0, 1.0, "steer") == pytest.approx(0.25)
    assert share_of_gain(0.3, 0.2, 0.2, "ablate") is None  # no gain to share


def test_bootstrap_cis():
    v = torch.linspace(0, 1, 101)
    m, lo, hi = mean_ci(v, seed=1)
    assert m == pytest.approx(0.5) and lo < 0.5 < hi and hi - lo < 0.2
    assert paired_difference_ci(v, v) == (0.0, 0.0, 0.0)
    d, lo, hi = paired_difference_ci(v + 0.1, v)  # a constant shift: no prompt-to-prompt noise
    assert d == pytest.approx(0.1) and lo == pytest.approx(0.1) and hi == pytest.approx(0.1)


def test_matched_random_sets_avoid_the_main_set_and_match_its_removal():
    torch.manual_seed(0)
    sae = random_sae(16, 128, seed=0)
    acts = torch.randn(3000, 16)
    freq = (sae.encode(acts) > 0).float().mean(0)
    main = [0, 1, 2, 3]
    target, draws = matched_random_sets(sae, acts, freq, main, n_draws=5, seed=0)
    assert target == pytest.approx(removed_variance_share(sae, acts, main))
    assert len(draws) == 5
    for d in draws:
        assert len(set(d.features)) == 4 and not set(d.features) & set(main)
    ratios = [d.removed_share / target for d in draws]
    assert all(0.5 < r < 2 for r in ratios), ratios


def test_arms_share_prompts_and_seeds_and_kl_is_zero_without_change(tiny_hf_dir):
    model = GPT2LMHeadModel.from_pretrained(tiny_hf_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_hf_dir)
    tok.pad_token = tok.pad_token or tok.eos_token
    rm = LexiconRewardModel({"great": 2.0, "bad": -2.0, "fun": 1.0, "terrible": -3.0})
    prompts = ["this movie is", "a bad", "the acting"] * 4
    plain = generate_and_score(model, tok, prompts, rm, 6, seed=3)
    again = generate_and_score(
        model, tok, prompts, rm, 6, seed=3, edits={1: steering(torch.zeros(32), 1.0)}
    )
    assert torch.equal(plain.samples.sequences, again.samples.sequences)
    assert torch.equal(plain.rewards, again.rewards) and plain.rewards.shape == (12,)
    sae = random_sae(32, 64, seed=0)
    # the sampled log-probs come from generation's own (KV-cached) logits: equal to a separate
    # forward to float rounding
    assert abs(intervention_kl(model, plain.samples, {1: steering(torch.zeros(32), 1.0)})) < 1e-5
    ablated = generate_and_score(
        model, tok, prompts, rm, 6, seed=3, edits={1: ablation(sae, range(64))}
    )
    # a real change of the model: the estimate moves off 0 (on 12 samples of a near-uniform
    # random model it is small and may fall either side)
    assert intervention_kl(model, ablated.samples, {1: ablation(sae, range(64))}) != 0.0


def test_sampled_logprobs_equal_a_forward_pass_with_and_without_edits(tiny_hf_dir):
    """``intervention_kl`` reads the intervened model's log-probs off its own generation instead
    of a second forward pass: they must be what that forward pass gives."""
    from irmlens.rlhf.sampling import completion_logprobs
    from irmlens.validate.interventions import edit_blocks

    model = GPT2LMHeadModel.from_pretrained(tiny_hf_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_hf_dir)
    tok.pad_token = tok.pad_token or tok.eos_token
    rm = LexiconRewardModel({"great": 2.0, "bad": -2.0})
    prompts = ["this movie is", "a bad", "the acting was really"] * 3
    torch.manual_seed(0)
    edits = {1: steering(5 * torch.randn(32), 1.0)}  # a large push: a model visibly changed
    for e in (None, edits):
        gens = generate_and_score(model, tok, prompts, rm, 7, seed=1, edits=e)
        with edit_blocks(model, e):
            forward = completion_logprobs(model, gens.samples, batch_size=4)
        assert gens.samples.logprobs.shape == (9,)
        assert torch.allclose(gens.samples.logprobs, forward, atol=1e-4), (e, forward)
    kl = intervention_kl(model, gens.samples, edits)
    with edit_blocks(model, edits):
        slow = completion_logprobs(model, gens.samples)
    assert kl == pytest.approx(
        float((slow - completion_logprobs(model, gens.samples)).mean()), abs=1e-4
    )
    assert kl > 1e-2

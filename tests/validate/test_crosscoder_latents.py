"""Crosscoder ablation and steering inside HF models (irmlens.validate.crosscoder): the
lockstep companions give the intervened model's edit the same codes during cached generation as a
full forward pass over the finished sequences does, and the edits are the crosscoder's own
decoded contributions."""

import pytest
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel

from irmlens.rlhf.sampling import completion_logprobs, sample_completions
from irmlens.validate.crosscoder import (
    CrosscoderAblation,
    CrosscoderDifference,
    CrosscoderSide,
    paired_codes,
)
from irmlens.validate.interventions import edit_blocks, hf_blocks, steering_vector
from sae_training.crosscoder import Crosscoder

LAYER, MODELS = 1, ["base", "rlhf", "null"]


def _perturbed(path, seed: int, scale: float):
    model = GPT2LMHeadModel.from_pretrained(path).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def _block_outputs(model, ids, mask):
    seen = {}

    def record(_m, _i, out):
        seen["h"] = out[0] if isinstance(out, tuple) else out

    handle = hf_blocks(model)[LAYER].register_forward_hook(record)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    handle.remove()
    return seen["h"]


@pytest.fixture(scope="module")
def trio(tiny_hf_dir):
    models = {
        "base": _perturbed(tiny_hf_dir, 0, 0.0),
        "rlhf": _perturbed(tiny_hf_dir, 1, 0.02),
        "null": _perturbed(tiny_hf_dir, 2, 0.01),
    }
    tok = AutoTokenizer.from_pretrained(tiny_hf_dir)
    tok.pad_token = tok.pad_token or tok.eos_token
    tok.padding_side = "left"
    texts = ["this movie is great fun , and the acting", "a bad , boring film", "the plot"]
    enc = tok(texts, return_tensors="pt", padding=True)
    acts = {m: _block_outputs(models[m], enc["input_ids"], enc["attention_mask"]) for m in MODELS}
    flat = {m: a.reshape(-1, a.shape[-1]) for m, a in acts.items()}
    cc = Crosscoder(3, flat["base"].shape[1], 64, "batchtopk", k=8)
    cc.init_weights(1.0, seed=0)
    with torch.no_grad():
        cc.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        cc.input_scale.copy_(torch.tensor([0.7, 1.3, 1.0]))
        cc.calibrate_threshold(torch.stack([flat[m] for m in MODELS], dim=1))
    return models, tok, texts, cc.eval(), enc


def _ablation(models, cc, features):
    side = CrosscoderSide(cc, MODELS, "rlhf")
    companions = {m: models[m] for m in ("base", "null")}
    return {
        (LAYER, "resid_post"): CrosscoderAblation(side, companions, LAYER, "resid_post", features)
    }


@pytest.mark.parametrize("padded", [True, False])
def test_lockstep_codes_in_cached_generation_match_a_full_pass(trio, padded):
    """Sampling keeps the intervened model's log-probs from the generation's own logits (KV cache,
    one token per pass, companions run on each); a full pass over the finished sequences with the
    same edit must give the same log-probs, and they must differ from the unedited model's.
    Unpadded: one prompt, whose all-ones mask generate drops (attention_mask None)."""
    models, tok, texts, cc, _ = trio
    texts = texts if padded else texts[:1]
    edits = _ablation(models, cc, range(cc.width))
    with edit_blocks(models["rlhf"], edits):
        samples = sample_completions(models["rlhf"], tok, texts, 6, seed=0, with_logprobs=True)
        full = completion_logprobs(models["rlhf"], samples)
    # to 5e-3 nats per completion (~-34 nats, six tokens): the cached one-token passes and the
    # full pass reduce in other orders; an AMD EPYC agreed to 1e-4, an Intel Xeon (AVX-512, AMX)
    # to 2.6e-3. The edit itself moves them by 0.09 (one prompt) to 1.2 nats: 10x the tolerance
    # at least (asserted below)
    assert torch.allclose(samples.logprobs, full, atol=5e-3), (samples.logprobs, full)
    unedited = completion_logprobs(models["rlhf"], samples)
    assert (unedited - full).abs().max() > 5e-2


def test_ablation_subtracts_the_latents_rlhf_contributions(trio):
    models, _, _, cc, enc = trio
    ids, mask = enc["input_ids"], enc["attention_mask"]
    feats = [3, 10, 41]
    acts = {m: _block_outputs(models[m], ids, mask) for m in MODELS}
    with edit_blocks(models["rlhf"], _ablation(models, cc, feats)):
        edited = _block_outputs(models["rlhf"], ids, mask)
    flat = {m: a.reshape(-1, a.shape[-1]) for m, a in acts.items()}
    codes = paired_codes(cc, flat, MODELS)
    keep = torch.zeros(cc.width)
    keep[feats] = 1
    d_rlhf = cc.W_dec.detach()[1] / cc.input_scale[1]
    expected = flat["rlhf"] - (codes * keep) @ d_rlhf
    assert (codes[:, feats] > 0).any()  # the latents fire somewhere, so something is removed
    assert torch.allclose(edited.reshape(-1, edited.shape[-1]), expected, atol=1e-5)


def test_steering_vector_is_the_tuned_minus_base_decoder_difference(trio):
    _, _, _, cc, _ = trio
    diff = CrosscoderDifference(cc, MODELS, "rlhf")
    mean_codes = torch.rand(cc.width, generator=torch.Generator().manual_seed(0))
    feats = [0, 5, 7]
    vec = steering_vector(diff, mean_codes, feats)
    W = cc.W_dec.detach()
    expected = sum(
        mean_codes[j] * (W[1, j] / cc.input_scale[1] - W[0, j] / cc.input_scale[0]) for j in feats
    )
    assert torch.allclose(vec, expected, atol=1e-5)


def test_an_uncalibrated_batchtopk_crosscoder_is_refused(trio):
    models, _, _, cc, _ = trio
    raw = Crosscoder(3, cc.d_in, 64, "batchtopk", k=8)
    with pytest.raises(ValueError, match="threshold"):
        _ablation(models, raw, [0])

"""Feature ablation and steering hooks on HF blocks, checked against the SAE's own encode/decode."""

import pytest
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel

from irmlens.rlhf.sampling import completion_logprobs, sample_completions
from irmlens.validate.interventions import (
    ablation,
    decoded_contribution,
    edit_block_output,
    hf_blocks,
    removed_variance_share,
    steering,
    steering_vector,
)
from sae_training.train import random_sae

LAYER = 1


@pytest.fixture(scope="module")
def model_and_sae(tiny_hf_dir):
    model = GPT2LMHeadModel.from_pretrained(tiny_hf_dir).eval()
    sae = random_sae(model.config.n_embd, 64, seed=0)
    with torch.no_grad():  # a non-zero decoder bias, so decode(0) is not trivially 0
        sae.b_dec.normal_(0, 0.1)
    tok = AutoTokenizer.from_pretrained(tiny_hf_dir)
    ids = tok(["this movie is great fun , and the acting", "a bad , boring film"], padding=True)
    return model, sae, tok, torch.tensor(ids["input_ids"])


def _block_output(model, ids, edit=None):
    """Block LAYER's output (after any edit) and the logits."""
    seen = {}

    def record(_m, _i, out):
        seen["h"] = out[0] if isinstance(out, tuple) else out

    with torch.no_grad():
        if edit is None:
            handle = hf_blocks(model)[LAYER].register_forward_hook(record)
            logits = model(ids).logits
        else:
            with edit_block_output(model, LAYER, edit):
                handle = hf_blocks(model)[LAYER].register_forward_hook(record)
                logits = model(ids).logits
        handle.remove()
    return seen["h"], logits


def test_ablating_every_feature_leaves_the_sae_error(model_and_sae):
    model, sae, _, ids = model_and_sae
    h, _ = _block_output(model, ids)
    edited, _ = _block_output(model, ids, ablation(sae, range(sae.cfg.d_sae)))
    with torch.no_grad():
        codes = sae.encode(h)
        error_model = h - sae.decode(codes) + sae.b_dec  # the SAE error (plus its bias)
    assert torch.allclose(edited, error_model, atol=1e-5)
    assert torch.allclose(sae.decode(torch.zeros_like(codes)), sae.b_dec.expand_as(h), atol=1e-6)
    # one feature: exactly its code times its decoder row
    c = decoded_contribution(sae, codes, [3])
    assert torch.allclose(c, codes[..., 3:4] * sae.W_dec[3], atol=1e-6)


def test_the_identity_interventions_change_nothing(model_and_sae):
    model, sae, _, ids = model_and_sae
    _, logits = _block_output(model, ids)
    v = steering_vector(sae, torch.rand(sae.cfg.d_sae), range(10))
    for edit in (steering(v, 0.0), ablation(sae, [])):
        _, edited = _block_output(model, ids, edit)
        assert torch.equal(edited, logits)


def test_steering_adds_its_vector_at_every_position_and_reaches_generation(model_and_sae):
    model, sae, tok, ids = model_and_sae
    h, _ = _block_output(model, ids)
    change = torch.zeros(sae.cfg.d_sae)
    change[[2, 5]] = torch.tensor([1.5, -0.5])
    v = steering_vector(sae, change, [2, 5])
    assert torch.allclose(v, 1.5 * sae.W_dec[2] - 0.5 * sae.W_dec[5], atol=1e-6)
    edited, _ = _block_output(model, ids, steering(v, 2.0))
    assert torch.allclose(edited - h, (2.0 * v).expand_as(h), atol=1e-5)
    tok.pad_token = tok.pad_token or tok.eos_token
    prompts = ["this movie is", "the plot"]
    plain = sample_completions(model, tok, prompts, 6, seed=0)
    again = sample_completions(model, tok, prompts, 6, seed=0)
    assert torch.equal(plain.sequences, again.sequences)  # same seeds, same samples
    calls = []

    def counted(h):
        calls.append(h.shape[1])
        return steering(v, 50.0)(h)

    with edit_block_output(model, LAYER, counted):
        sample_completions(model, tok, prompts, 6, seed=0)
        steered_lp = completion_logprobs(model, plain)
    # the prompt's forward pass, then one per new token (KV cache: one position each)
    assert len(calls) >= 6 and calls[0] == plain.prompt_len
    assert not torch.allclose(steered_lp, completion_logprobs(model, plain))
    after = sample_completions(model, tok, prompts, 6, seed=0)
    assert torch.equal(plain.sequences, after.sequences)  # the hook is gone afterwards


def test_removed_variance_share(model_and_sae):
    model, sae, _, ids = model_and_sae
    h, _ = _block_output(model, ids)
    acts = h.reshape(-1, h.shape[-1])
    assert removed_variance_share(sae, acts, []) == 0.0
    some, more = (
        removed_variance_share(sae, acts, range(8)),
        removed_variance_share(sae, acts, range(64)),
    )
    assert 0.0 < some and some != more


def test_an_mlp_out_edit_sits_where_transformer_lens_reads_hook_mlp_out(model_and_sae, tiny_hf_dir):
    """The MLP module's output is TransformerLens's ``blocks.L.hook_mlp_out`` (to 1e-4), and an
    edit there reaches the residual stream: adding v to the MLP output adds v to the block's
    output and nowhere before it."""
    from irmlens.models.hooked import load_hooked_model
    from irmlens.validate.interventions import edit_blocks, hooked_module

    model, _, _, ids = model_and_sae
    seen = {}
    handle = hooked_module(model, LAYER, "mlp_out").register_forward_hook(
        lambda _m, _i, out: seen.__setitem__("mlp", out)
    )
    with torch.no_grad():
        model(ids)
    handle.remove()
    hooked = load_hooked_model(tiny_hf_dir, "cpu")
    _, cache = hooked.run_with_cache(ids, names_filter=f"blocks.{LAYER}.hook_mlp_out")
    assert torch.allclose(seen["mlp"], cache[f"blocks.{LAYER}.hook_mlp_out"], atol=1e-4)
    v = torch.randn(model.config.n_embd)
    h, _ = _block_output(model, ids)
    with edit_blocks(model, {(LAYER, "mlp_out"): steering(v, 1.0)}):
        shifted, _ = _block_output(model, ids)
    assert torch.allclose(shifted, h + v, atol=1e-4)


def test_an_mlp_out_edit_is_refused_where_a_norm_follows_the_mlp():
    from irmlens.validate.interventions import hooked_module

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = torch.nn.Linear(4, 4)
            self.post_feedforward_layernorm = torch.nn.LayerNorm(4)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.layers = torch.nn.ModuleList([Block()])

    with pytest.raises(ValueError, match="post_feedforward_layernorm"):
        hooked_module(Model(), 0, "mlp_out")

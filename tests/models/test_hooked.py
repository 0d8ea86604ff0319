import torch

from irmlens.models.hooked import load_hf_model, load_hooked_model


def test_hooked_logits_and_residuals_match_hf(tiny_hf_dir):
    hf, tok = load_hf_model(tiny_hf_dir)
    hooked = load_hooked_model(tiny_hf_dir, hf_model=hf, tokenizer=tok)
    ids = tok(["this movie is great fun , and the plot is bad ."], return_tensors="pt")["input_ids"]
    assert ids[0, 0] == tok.bos_token_id
    with torch.no_grad():
        hf_out = hf(ids, output_hidden_states=True)
        logits = hooked(ids)
        _, cache = hooked.run_with_cache(
            ids, names_filter="blocks.1.hook_resid_post", stop_at_layer=2
        )
    assert torch.allclose(hf_out.logits, logits, atol=1e-4), (hf_out.logits - logits).abs().max()
    assert torch.allclose(hf_out.hidden_states[2], cache["blocks.1.hook_resid_post"], atol=1e-4)

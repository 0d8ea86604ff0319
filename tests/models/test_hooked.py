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


def test_a_read_only_model_folder_without_n_ctx_loads_and_is_left_untouched(tiny_hf_dir, tmp_path):
    """transformers 5 saves GPT-2 without ``n_ctx``, which TransformerLens needs: irmlens patches
    a copy of the config, never the user's folder (which may be read-only)."""
    import json
    import os
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_hf_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("n_ctx", None)
    (folder / "config.json").write_text(json.dumps(cfg))
    before = (folder / "config.json").read_bytes()
    os.chmod(folder / "config.json", 0o444)
    os.chmod(folder, 0o555)
    try:
        hf, tok = load_hf_model(folder)
        hooked = load_hooked_model(folder, hf_model=hf, tokenizer=tok)
        ids = tok(["a bad , boring film ."], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            assert torch.allclose(hf(ids).logits, hooked(ids), atol=1e-4)
        assert hooked.cfg.n_ctx == cfg["n_positions"]
        assert hooked.cfg.model_name == "model"  # named after the user's folder, as before
        assert (folder / "config.json").read_bytes() == before
    finally:
        os.chmod(folder, 0o755)

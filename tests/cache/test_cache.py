import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from irmlens.cache.capture import build_paired_cache, capture_residuals
from irmlens.cache.store import cache_is_complete, load_activations, load_token_rows
from irmlens.cache.tokens import tokenize_rows
from irmlens.models.hooked import load_hf_model


def _tiny_hooked(seed):
    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(
        n_layers=3,
        d_model=16,
        n_ctx=16,
        d_head=8,
        n_heads=2,
        d_mlp=32,
        d_vocab=300,
        act_fn="gelu",
        normalization_type="LN",
    )
    return HookedTransformer(cfg).eval()


def test_word_ids_mark_last_token_of_each_word(tiny_hf_dir):
    _, tok = load_hf_model(tiny_hf_dir)
    text = "this movie is unbelievably great ."
    rows = tokenize_rows(tok, [text], n_ctx=32)
    n_tokens = len(tok(text, add_special_tokens=False)["input_ids"])
    assert rows.tokens[0, 0] == tok.bos_token_id
    assert (
        not rows.valid[0, 0]
        and rows.valid[0, 1 : n_tokens + 1].all()
        and not rows.valid[0, n_tokens + 1 :].any()
    )
    ended = [rows.words[w] for w in rows.word_id[0].tolist() if w >= 0]
    assert ended == text.split()  # each word exactly once, in order, at its last token


def test_long_texts_are_split_into_rows_starting_with_bos(tiny_hf_dir):
    _, tok = load_hf_model(tiny_hf_dir)
    rows = tokenize_rows(tok, ["the plot is bad . " * 30], n_ctx=16)
    assert rows.tokens.shape[1] == 16 and len(rows.tokens) > 3
    assert (rows.tokens[:, 0] == tok.bos_token_id).all()


def test_capture_matches_full_forward_and_drops_bos_and_padding(tiny_hf_dir, tmp_path):
    _, tok = load_hf_model(tiny_hf_dir)
    rows = tokenize_rows(tok, ["this movie is great fun .", "a bad film ."], n_ctx=16)
    models = {"base": _tiny_hooked(0), "rlhf": _tiny_hooked(1)}
    acts = capture_residuals(models["base"], rows, [0, 2], batch_size=1)
    _, full = models["base"].run_with_cache(rows.tokens)
    for layer in (0, 2):
        expected = full[f"blocks.{layer}.hook_resid_post"][rows.valid]
        assert torch.allclose(acts[f"blocks.{layer}.hook_resid_post"], expected, atol=1e-5)
    build_paired_cache(models, rows, [2], tmp_path, {"test": True}, batch_size=2)
    assert cache_is_complete(tmp_path)
    a = load_activations(tmp_path, "rlhf", "blocks.2.hook_resid_post")
    assert a.shape == (int(rows.valid.sum()), 16)
    again = load_token_rows(tmp_path)
    assert torch.equal(again.tokens, rows.tokens) and again.words == rows.words
    # a corrupted file is detected, never silently used
    p = tmp_path / "base" / "blocks.2.hook_resid_post.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    assert not cache_is_complete(tmp_path)

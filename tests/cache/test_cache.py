import json

import pytest
import torch

from irmlens.cache.capture import build_paired_cache, capture_residuals
from irmlens.cache.store import (
    cache_is_complete,
    hook_statistics,
    load_activations,
    load_token_rows,
    quantize_int8,
    shard_path,
    stream_batches,
)
from irmlens.cache.tokens import tokenize_rows
from irmlens.models.hooked import load_hf_model

H2 = "blocks.2.hook_resid_post"


@pytest.fixture(scope="module")
def rows(tiny_hf_dir):
    _, tok = load_hf_model(tiny_hf_dir)
    texts = [f"{c} this movie is great fun , a good film ." for c in "bcdefghijklmnop"]
    return tokenize_rows(tok, texts, n_ctx=16)


def test_word_ids_mark_last_token_of_each_word(tiny_hf_dir):
    _, tok = load_hf_model(tiny_hf_dir)
    text = "this movie is unbelievably great ."
    r = tokenize_rows(tok, [text], n_ctx=32)
    n_tokens = len(tok(text, add_special_tokens=False)["input_ids"])
    assert r.tokens[0, 0] == tok.bos_token_id
    assert (
        not r.valid[0, 0]
        and r.valid[0, 1 : n_tokens + 1].all()
        and not r.valid[0, n_tokens + 1 :].any()
    )
    ended = [r.words[w] for w in r.word_id[0].tolist() if w >= 0]
    assert ended == text.split()  # each word exactly once, in order, at its last token


def test_long_texts_are_split_into_rows_starting_with_bos(tiny_hf_dir):
    _, tok = load_hf_model(tiny_hf_dir)
    r = tokenize_rows(tok, ["the plot is bad . " * 30], n_ctx=16)
    assert r.tokens.shape[1] == 16 and len(r.tokens) > 3
    assert (r.tokens[:, 0] == tok.bos_token_id).all()


def test_capture_matches_full_forward_and_drops_bos_and_padding(rows, make_hooked):
    model = make_hooked(0)
    acts = capture_residuals(model, rows, [0, 2], batch_size=3)
    _, full = model.run_with_cache(rows.tokens)
    for layer in (0, 2):
        expected = full[f"blocks.{layer}.hook_resid_post"][rows.valid]
        assert torch.allclose(acts[f"blocks.{layer}.hook_resid_post"], expected, atol=1e-5)


@pytest.mark.parametrize("dtype,rel_tol", [("float32", 0.0), ("bfloat16", 2**-8), ("int8", None)])
def test_sharded_cache_round_trips_within_the_stated_error_bound(
    rows, tmp_path, dtype, rel_tol, make_hooked
):
    models = {"base": make_hooked(0), "rlhf": make_hooked(1)}
    m = build_paired_cache(
        models,
        rows,
        [2],
        tmp_path,
        {"test": True},
        batch_size=2,
        hook_kinds=("resid_post", "mlp_out"),
        dtype=dtype,
        shard_rows=5,
    )
    assert m["n_shards"] == -(-len(rows.tokens) // 5) >= 3 and cache_is_complete(tmp_path)
    assert m["hooks"] == [H2, "blocks.2.hook_mlp_out"]
    exact = capture_residuals(models["rlhf"], rows, [2])[H2]
    got = load_activations(tmp_path, "rlhf", H2)
    assert got.shape == exact.shape == (int(rows.valid.sum()), 16)
    if dtype == "int8":
        bound = exact.abs().amax(dim=1, keepdim=True) / 254 + 1e-6
        assert ((got - exact).abs() <= bound).all()
    else:
        assert ((got - exact).abs() <= rel_tol * exact.abs() + 1e-7).all()
    stats = hook_statistics(tmp_path, "rlhf", H2)  # from float32 values, whatever the storage
    assert torch.allclose(torch.tensor(stats["mean"]).float(), exact.mean(0), atol=1e-5)
    assert stats["mean_norm"] == pytest.approx(float(exact.norm(dim=1).mean()), rel=1e-5)
    again = load_token_rows(tmp_path)
    assert torch.equal(again.tokens, rows.tokens) and again.words == rows.words


def test_int8_error_bound_on_random_rows():
    x = torch.randn(500, 64) * torch.rand(500, 1) * 10
    q, scale = quantize_int8(x)
    assert q.dtype == torch.int8
    assert (
        (q.float() * scale[:, None] - x).abs() <= x.abs().amax(1, keepdim=True) / 254 + 1e-6
    ).all()


def test_resume_rewrites_only_missing_or_corrupt_shards(rows, tmp_path, make_hooked):
    models = {"base": make_hooked(0), "rlhf": make_hooked(1)}
    build_paired_cache(models, rows, [2], tmp_path, {}, shard_rows=4)
    reference = load_activations(tmp_path, "base", H2)
    # simulate an interrupted run: the manifest is gone, one shard is corrupt, one is missing
    (tmp_path / "manifest.json").unlink()
    p1 = shard_path(tmp_path, "base", H2, 1)
    data = bytearray(p1.read_bytes())
    data[-1] ^= 0xFF
    p1.write_bytes(bytes(data))
    shard_path(tmp_path, "rlhf", H2, 2).unlink()
    assert not cache_is_complete(tmp_path)
    before = shard_path(tmp_path, "base", H2, 0).stat().st_mtime_ns
    build_paired_cache(models, rows, [2], tmp_path, {}, shard_rows=4)
    assert cache_is_complete(tmp_path)
    assert (
        shard_path(tmp_path, "base", H2, 0).stat().st_mtime_ns == before
    )  # shard 0 verified, kept
    assert torch.equal(load_activations(tmp_path, "base", H2), reference)
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert len(progress["shards"]) == 2 * -(-len(rows.tokens) // 4)


def test_stream_batches_visits_every_position_once_per_epoch(rows, tmp_path, make_hooked):
    build_paired_cache(
        {"base": make_hooked(0)}, rows, [2], tmp_path, {}, shard_rows=3, dtype="float32"
    )
    full = load_activations(tmp_path, "base", H2)
    batches = list(stream_batches(tmp_path, "base", H2, batch_size=7, seed=0, shards_in_buffer=2))
    seen = torch.cat(batches)
    assert all(len(b) == 7 for b in batches) and len(full) - 7 < len(seen) <= len(full)
    # every streamed row is a cached row, and no row comes more often than it was cached
    uniq, counts = torch.unique(full, dim=0, return_counts=True)
    idx = (seen[:, None, :] == uniq[None, :, :]).all(-1).float().argmax(1)
    assert torch.equal(uniq[idx], seen)
    assert (torch.bincount(idx, minlength=len(uniq)) <= counts).all()
    again = torch.cat(
        list(stream_batches(tmp_path, "base", H2, batch_size=7, seed=0, shards_in_buffer=2))
    )
    assert torch.equal(seen, again)


def test_unknown_words_are_not_scored_and_not_part_of_the_next_word():
    from irmlens.models.pretrain import train_tokenizer

    tok = train_tokenizer(["a great movie , a great film ."] * 5, 20, kind="word")
    r = tokenize_rows(tok, ["a zorblax great movie"], n_ctx=8)
    words = [r.words[w] if w >= 0 else None for w in r.word_id[0].tolist()]
    assert words[:5] == [None, "a", None, "great", "movie"]  # zorblax reads as <unk>
    assert r.in_word[0, :5].tolist() == [False, True, False, True, True]


def test_readers_can_verify_shards_and_statistics_live_in_them(rows, tmp_path, make_hooked):
    from irmlens.errors import CorruptCacheError

    build_paired_cache({"base": make_hooked(0)}, rows, [2], tmp_path, {}, shard_rows=4)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["forward"] == {"base": "float32"}
    assert manifest["error_bound"].startswith("relative 2^-8")
    # progress.json keeps checksums and counts only: it is rewritten after every shard
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert all(set(v) == {"sha256", "n"} for v in progress["shards"].values())
    # the statistics, summed from the shards, are those of the activations before encoding
    full = capture_residuals(make_hooked(0), rows, [2], batch_size=4)[H2]
    stats = hook_statistics(tmp_path, "base", H2)
    assert torch.allclose(torch.tensor(stats["mean"]), full.double().mean(0).float(), atol=1e-5)
    assert stats["mean_norm"] == pytest.approx(float(full.norm(dim=1).mean()), rel=1e-5)
    reference = load_activations(tmp_path, "base", H2, verify=True)
    p = shard_path(tmp_path, "base", H2, 1)
    data = bytearray(p.read_bytes())
    data[-5] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(CorruptCacheError, match="shard-00001.*does not match its sha256"):
        load_activations(tmp_path, "base", H2, verify=True)
    assert load_activations(tmp_path, "base", H2).shape == reference.shape  # unchecked read


def test_no_token_positions_is_a_clear_error(rows, tmp_path, make_hooked):
    from dataclasses import replace

    from irmlens.errors import ConfigError

    empty = replace(rows, valid=torch.zeros_like(rows.valid))
    with pytest.raises(ConfigError, match="no token positions"):
        build_paired_cache({"base": make_hooked(0)}, empty, [2], tmp_path, {})


def test_recorded_token_logprobs_equal_a_separate_forward_and_resume(rows, tmp_path, make_hooked):
    """The cache's token log-probs (what the target stage reads instead of a second pass) equal
    ``token_log_ratios``'s own forward, a later model's activations are unchanged by them, and a
    lost log-prob shard is rewritten on resume."""
    from irmlens.cache.store import TOKEN_LOGPROBS, load_token_logprobs
    from irmlens.irm.implicit import token_log_ratios

    models = {"base": make_hooked(0), "rlhf": make_hooked(1), "null": make_hooked(2)}
    kw = {"batch_size": 3, "dtype": "float32", "shard_rows": 4, "token_logprobs": ("base", "rlhf")}
    m = build_paired_cache(models, rows, [1], tmp_path, {}, **kw)
    assert m["token_logprobs"] == ["base", "rlhf"]
    base, rlhf = (load_token_logprobs(tmp_path, n) for n in ("base", "rlhf"))
    assert load_token_logprobs(tmp_path, "null") is None
    expected = token_log_ratios(models["base"], models["rlhf"], rows.tokens, batch_size=5)
    assert base.shape == rows.tokens.shape
    assert torch.allclose(rlhf - base, expected, atol=1e-5)
    assert float((rlhf - base).abs().max()) > 1e-2  # the two models differ
    _, full = models["null"].run_with_cache(rows.tokens)
    assert torch.allclose(
        load_activations(tmp_path, "null", "blocks.1.hook_resid_post"),
        full["blocks.1.hook_resid_post"][rows.valid],
        atol=1e-5,
    )
    shard_path(tmp_path, "rlhf", TOKEN_LOGPROBS, 1).unlink()
    assert not cache_is_complete(tmp_path)
    build_paired_cache(models, rows, [1], tmp_path, {}, **kw)
    assert cache_is_complete(tmp_path)
    assert torch.equal(load_token_logprobs(tmp_path, "rlhf"), rlhf)

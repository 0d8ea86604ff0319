import math

from irmlens.data.corpus import load_reviews, split_reviews
from irmlens.models.hooked import load_hf_model
from irmlens.models.pretrain import (
    PretrainConfig,
    load_pretrain_metrics,
    pretrain_tiny_lm,
    train_tokenizer,
)


def test_tokenizer_prepends_bos_and_round_trips():
    tok = train_tokenizer(["a great movie , truly great .", "a dull film ."] * 10, 280)
    ids = tok("a great film .")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids, skip_special_tokens=True) == "a great film ."


def test_short_pretraining_beats_uniform_and_saves_an_hf_folder(assets, tmp_path):
    s = split_reviews(load_reviews(assets.reviews), 10, 10, seed=0)
    cfg = PretrainConfig(
        vocab_size=512,
        n_layer=1,
        d_model=32,
        n_head=2,
        n_ctx=32,
        batch_size=16,
        max_steps=60,
        warmup_steps=5,
    )
    m = pretrain_tiny_lm(cfg, s.train[:100], s.validation, tmp_path / "lm")
    assert m["steps"] == 60
    # uniform guessing has perplexity = vocab size; a few dozen steps must already do far better
    assert math.isfinite(m["validation_perplexity"]) and m["validation_perplexity"] < 0.5 * 512
    assert load_pretrain_metrics(tmp_path / "lm")["steps"] == 60
    hf, tok = load_hf_model(tmp_path / "lm")
    assert hf.config.n_layer == 1 and tok.bos_token_id is not None
    assert not list(tmp_path.glob(".lm.*"))  # no temp folder left behind


def test_pretraining_is_reproducible_run_to_run(assets, tmp_path):
    """Issue 18: where training ran slower than max_steps / time_budget_s (a slow or busy machine),
    the learning-rate schedule followed the wall clock and the budget cut training short, so the
    same config gave another model on each run. Now the schedule is the step's alone."""
    from safetensors.torch import load_file

    s = split_reviews(load_reviews(assets.reviews), 10, 10, seed=0)
    cfg = PretrainConfig(
        vocab_size=256, n_layer=1, d_model=16, n_head=2, n_ctx=16, batch_size=8, max_steps=25
    )
    for name in ("a", "b"):
        pretrain_tiny_lm(cfg, s.train[:40], s.validation[:5], tmp_path / name)
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("a", "b"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_a_cached_model_cut_short_is_never_reused_as_the_full_one(tmp_path):
    """A wall-clock budget once stopped pretraining at 26 of 400 steps and cached the result
    under the full model's fingerprint."""
    import json

    from irmlens.stages.models import cached_model_finished

    (tmp_path / "pretrain.json").write_text(json.dumps({"steps": 26, "max_steps": 400}))
    assert not cached_model_finished(tmp_path, 400)
    (tmp_path / "pretrain.json").write_text(json.dumps({"steps": 400, "finished": True}))
    assert cached_model_finished(tmp_path, 400)
    (tmp_path / "pretrain.json").write_text('{"steps": 4')  # damaged
    assert not cached_model_finished(tmp_path, 400)

from pathlib import Path

import pytest

from irmlens.cli import offline_env

offline_env()


@pytest.fixture(scope="session")
def triton_interpreter():
    """Run Python source in a fresh process under ``TRITON_INTERPRET=1`` (Triton kernels on the
    CPU, read when the kernels are defined), from the repository root; returns its stdout, and
    fails the test with its stderr's tail when it exits non-zero."""
    import os
    import subprocess
    import sys

    def run(source: str) -> str:
        out = subprocess.run(
            [sys.executable, "-c", source],
            env={**os.environ, "TRITON_INTERPRET": "1"},
            cwd=Path(__file__).resolve().parents[1],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout

    return run


@pytest.fixture(scope="session")
def assets():
    """The real offline assets, fetched once into the irmlens cache (a no-op when present)."""
    from irmlens.data.assets import fetch_assets

    return fetch_assets(log=lambda *a: None)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A small random GPT-2 with a BPE tokenizer, saved as an HF folder."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from irmlens.models.pretrain import train_tokenizer

    torch.manual_seed(0)
    texts = ["this movie is great fun , and the acting is good ."] * 20 + [
        "a bad , boring film with a terrible plot ."
    ] * 20
    tok = train_tokenizer(texts, 300)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=32,
        n_embd=32,
        n_layer=3,
        n_head=2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = GPT2LMHeadModel(cfg)
    d = tmp_path_factory.mktemp("tiny_hf")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def micro_base(assets):
    """The micro config's pretrained base model (cached in the irmlens home after the first run)."""
    from pathlib import Path

    from irmlens.config import load_config
    from irmlens.stages.context import StudyContext
    from irmlens.stages.models import ensure_base_model

    cfg = load_config(Path(__file__).parent / "micro.toml")
    splits = StudyContext(cfg, None).splits  # reads no run folder
    return ensure_base_model(cfg, splits, assets.reviews), splits


@pytest.fixture(scope="session")
def make_hooked():
    """Factory of small random HookedTransformers (seeded), for cache and SAE tests."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    def make(
        seed: int = 0, n_layers: int = 3, d_model: int = 16, n_ctx: int = 16, d_vocab: int = 300
    ):
        torch.manual_seed(seed)
        cfg = HookedTransformerConfig(
            n_layers=n_layers,
            d_model=d_model,
            n_ctx=n_ctx,
            d_head=8,
            n_heads=d_model // 8,
            d_mlp=2 * d_model,
            d_vocab=d_vocab,
            act_fn="gelu",
            normalization_type="LN",
        )
        return HookedTransformer(cfg).eval()

    return make


@pytest.fixture(scope="session")
def make_random_cache(make_hooked):
    """Factory of small activation caches (layer 1 of a seeded random model over seeded random
    token rows), for the SAE-training tests that read a cache."""

    def make(out, n_rows, n_ctx, d_model, d_vocab, shard_rows, skip_first_position=False):
        import torch

        from irmlens.cache.capture import build_paired_cache
        from irmlens.cache.tokens import TokenRows

        model = make_hooked(0, n_layers=2, d_model=d_model, n_ctx=n_ctx, d_vocab=d_vocab)
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(1, d_vocab, (n_rows, n_ctx), generator=g)
        valid = torch.ones_like(tokens, dtype=torch.bool)
        if skip_first_position:
            valid[:, 0] = False
        rows = TokenRows(tokens, valid, torch.full_like(tokens, -1), [])
        build_paired_cache(
            {"base": model}, rows, [1], out, {}, dtype="float32", shard_rows=shard_rows
        )
        return out

    return make


N_PLANTED = 60


@pytest.fixture(scope="session")
def planted(tmp_path_factory, assets):
    """A pair with a known difference (see tests/test_planted.py): base, after (v added to the
    embeddings of 60 words, scaled by their utilities) and null (base + 1e-3 weight noise)."""
    import random
    from collections import Counter

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from irmlens.data.corpus import load_reviews, split_reviews
    from irmlens.models.pretrain import train_tokenizer

    root = tmp_path_factory.mktemp("planted")
    splits = split_reviews(load_reviews(assets.reviews), 20, 40, 0)
    tok = train_tokenizer([r.text for r in splits.train], 1500, kind="word")
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    base = GPT2LMHeadModel(cfg).eval()
    # planted words: frequent alphabetic words of the held-out text (so they appear in the cache)
    counts = Counter(w for r in splits.heldout for w in r.text.split())
    vocab = tok.get_vocab()
    candidates = [w for w, _ in counts.most_common(400) if w.isalpha() and w in vocab]
    rng = random.Random(0)
    words = rng.sample(candidates[20:], N_PLANTED)  # skip the very commonest ("the", "a", ...)
    utilities = {w: rng.choice([-1, 1]) * rng.uniform(0.5, 3.0) for w in words}
    direction = torch.nn.functional.normalize(torch.randn(64), dim=0)
    scale = 3.0 * base.transformer.wte.weight.norm(dim=1).mean()
    after = GPT2LMHeadModel(cfg).eval()
    after.load_state_dict(base.state_dict())
    null = GPT2LMHeadModel(cfg).eval()
    null.load_state_dict(base.state_dict())
    with torch.no_grad():
        for w, u in utilities.items():
            after.transformer.wte.weight[vocab[w]] += scale * u * direction
        g = torch.Generator().manual_seed(1)
        for p in null.parameters():
            p.add_(1e-3 * p.std() * torch.randn(p.shape, generator=g))
    dirs = {}
    for name, model in (("base", base), ("after", after), ("null", null)):
        dirs[name] = root / name
        model.save_pretrained(dirs[name])
        tok.save_pretrained(dirs[name])
    lexicon = root / "planted_lexicon.tsv"
    lexicon.write_text("".join(f"{w}\t{u}\n" for w, u in utilities.items()))
    return dirs, lexicon, utilities, direction


@pytest.fixture(scope="session")
def planted_run(planted, tmp_path_factory):
    """The whole pipeline on the planted pair (a given pair: no RLHF stage), both layers studied
    and the IRM over both."""
    from irmlens.config import config_from_dict
    from irmlens.pipeline import run_study

    dirs, lexicon, utilities, direction = planted
    cfg = config_from_dict(
        {
            "name": "planted",
            "data": {"lexicon": str(lexicon), "n_validation": 20, "n_heldout": 40},
            "model": {
                "base": str(dirs["base"]),
                "rlhf": str(dirs["after"]),
                "null": str(dirs["null"]),
            },
            # both layers studied and one IRM over both (as the tiny default's): every feature
            # is then (dictionary, layer, index), and a layer-0 feature needs its own card
            "layers": {"top_k": 2},
            "cache": {"n_ctx": 64, "max_rows": 500},
            "sae": {
                "width_multipliers": [2, 4],
                "batch_size": 256,
                "epochs": 3.0,
                "wide_topk": {"k": 32},
                "ce_eval_rows": 16,
            },
            "irm": {"n_shuffles": 3, "paper_contexts_per_word": 3, "space": "multi_layer_pre"},
            "mediate": {"n_rows": 16, "recheck": 4, "max_k": 32, "n_bootstrap": 100},
            "validate": {
                "n_prompts": 16,
                "steering_scales": [1.0],
                "n_random_draws": 2,
                "n_bootstrap": 100,
                "perplexity_texts": 8,
                "single_feature_prompts": 8,
            },
            "labels": {"llm": "none"},
        }
    )
    out = tmp_path_factory.mktemp("planted_run")
    run_study(cfg, out)
    return out


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory, assets):
    """The micro study, run once (tests/test_pipeline_e2e.py; its pair is reused by
    tests/test_study_variants.py)."""
    from irmlens.cli import main

    out = tmp_path_factory.mktemp("runs") / "micro"
    assert main(["run", str(Path(__file__).parent / "micro.toml"), "--out", str(out)]) == 0
    return out

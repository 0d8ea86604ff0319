import pytest

from irmlens.cli import offline_env

offline_env()


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
    from irmlens.pipeline import ensure_base_model, load_splits

    cfg = load_config(Path(__file__).parent / "micro.toml")
    splits = load_splits(cfg, assets.reviews)
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

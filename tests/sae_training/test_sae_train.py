import torch
from sae_lens import SAE

from sae_training.train import SAETrainingConfig, encode_batched, evaluate_sae, load_sae, train_sae


def _sparse_data(n=6000, d=16, k=32, seed=0):
    """Activations that are sparse combinations of k planted directions."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1)
    codes = torch.rand(n, k, generator=g) * (torch.rand(n, k, generator=g) < 0.08)
    return codes @ dirs * 3 + 0.5, dirs


def test_sae_learns_planted_directions_and_saves_in_saelens_format(tmp_path):
    acts, dirs = _sparse_data()
    cfg = SAETrainingConfig(
        width=64, l1_coefficient=1.0, lr=1e-2, batch_size=256, epochs=40, seed=0
    )
    sae = train_sae(acts, cfg, "blocks.0.hook_resid_post", "synthetic", out_dir=tmp_path / "sae")
    m = evaluate_sae(sae, acts)
    assert m["explained_variance"] > 0.8, m
    assert m["l0"] < 10  # about 2.6 planted directions are active per row
    # most planted directions have a close decoder row
    cos = torch.nn.functional.normalize(sae.W_dec.detach(), dim=1) @ dirs.T
    assert (cos.max(0).values > 0.9).float().mean() > 0.9
    loaded = SAE.load_from_disk(str(tmp_path / "sae"))
    assert loaded.cfg.metadata.hook_name == "blocks.0.hook_resid_post"
    with torch.no_grad():
        assert torch.allclose(loaded.encode(acts[:100]), sae.encode(acts[:100]), atol=1e-5)
        assert torch.allclose(loaded(acts[:100]), sae(acts[:100]), atol=1e-5)
    assert torch.allclose(
        encode_batched(load_sae(tmp_path / "sae"), acts[:100], batch_size=7),
        loaded.encode(acts[:100]),
        atol=1e-5,
    )


def test_training_is_deterministic_under_a_seed():
    acts, _ = _sparse_data(n=2000)
    cfg = SAETrainingConfig(width=32, l1_coefficient=0.3, lr=3e-3, batch_size=256, epochs=1, seed=3)
    a = train_sae(acts, cfg, "h", "m")
    b = train_sae(acts, cfg, "h", "m")
    assert torch.equal(a.W_dec, b.W_dec) and torch.equal(a.W_enc, b.W_enc)

"""The hand-derived standard-SAE step (sae_training/fused.py) against sae-lens's autograd step."""

import pytest
import torch
from sae_lens.saes.sae import TrainStepInput

from sae_training.fused import standard_sae_step
from sae_training.train import SAETrainingConfig, make_training_sae, train_sae


def _acts(n=3000, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(20, d, generator=g), dim=1)
    codes = torch.rand(n, 20, generator=g) * (torch.rand(n, 20, generator=g) < 0.1)
    return codes @ dirs * 3 + 0.2 * torch.randn(n, d, generator=g)


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_gradients_equal_autograd_through_sae_lens(apply_b_dec):
    torch.manual_seed(0)
    sae = make_training_sae(SAETrainingConfig(width=40), 12, 100, "h", "m")
    sae.cfg.apply_b_dec_to_input = apply_b_dec
    with torch.no_grad():  # non-trivial biases, so every gradient term is exercised
        sae.b_dec.normal_(0, 0.3)
        sae.b_enc.normal_(0, 0.3)
    x, l1 = _acts(n=64), 0.7
    out = sae.training_forward_pass(TrainStepInput(x, {"l1": l1}, None, 0, False))
    out.loss.backward()
    losses, grads, x_hat, f, counts = standard_sae_step(sae, x, l1)
    assert torch.equal(counts, (out.feature_acts > 0).sum(0).float())
    assert torch.allclose(losses["mse_loss"], out.losses["mse_loss"], rtol=1e-5)
    assert torch.allclose(losses["l1_loss"], out.losses["l1_loss"], rtol=1e-5)
    assert torch.allclose(x_hat, out.sae_out, atol=1e-5)
    assert torch.allclose(f, out.feature_acts, atol=1e-6)
    assert 0.05 < (f > 0).float().mean() < 0.95  # both sides of the ReLU are exercised
    for name, grad in grads.items():
        ref = dict(sae.named_parameters())[name].grad
        assert grad.shape == ref.shape and grad.dtype == ref.dtype
        assert torch.allclose(grad, ref, rtol=1e-4, atol=1e-6), (name, (grad - ref).abs().max())


def test_bf16_step_stays_close_to_float32():
    torch.manual_seed(0)
    sae = make_training_sae(SAETrainingConfig(width=64), 12, 100, "h", "m")
    x = _acts(n=256)
    exact, g32, *_ = standard_sae_step(sae, x, 1.0)
    low, g16, *_ = standard_sae_step(sae, x, 1.0, torch.bfloat16)
    assert all(g.dtype == torch.float32 for g in g16.values())
    assert abs(float(low["mse_loss"] / exact["mse_loss"]) - 1) < 0.02
    for name in g32:
        cos = torch.nn.functional.cosine_similarity(g32[name].flatten(), g16[name].flatten(), 0)
        assert cos > 0.99, (name, cos)


@pytest.mark.parametrize("normalize", ["expected_average_only_in", "covariance_whitening"])
def test_fused_training_equals_sae_lens_training(normalize):
    """Whole runs (lr warm-up and cosine decay, L1 warm-up, clipping, Adam, scaling or whitening
    and its folding, dead-feature statistics) give the same SAE through either step."""
    acts = _acts()
    common = dict(
        width=48, l1_coefficient=0.5, lr=3e-3, batch_size=128, epochs=3, seed=1, normalize=normalize
    )
    ours = train_sae(acts, SAETrainingConfig(**common, trainer="fused"), "h", "m")
    ref = train_sae(acts, SAETrainingConfig(**common, trainer="sae-lens"), "h", "m")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        a, b = getattr(ours, name), getattr(ref, name)
        assert torch.allclose(a, b, atol=2e-5, rtol=1e-4), (name, (a - b).abs().max())
    assert ours.cfg.metadata.l0 == pytest.approx(ref.cfg.metadata.l0, rel=1e-6)
    assert ours.cfg.metadata.num_dead_features == ref.cfg.metadata.num_dead_features
    # and training moved the decoder directions a long way from the initialisation both runs
    # share (train_sae seeds before building the SAE; directions ignore the folded input scale)
    torch.manual_seed(common["seed"])
    init = make_training_sae(SAETrainingConfig(**common), 12, 1, "h", "m")
    cos = torch.nn.functional.cosine_similarity(ours.W_dec, init.W_dec, dim=1)
    assert cos.mean() < 0.9, cos.mean()


def test_a_zero_decoder_row_gives_zero_not_nan():
    torch.manual_seed(0)
    sae = make_training_sae(SAETrainingConfig(width=16), 12, 100, "h", "m")
    with torch.no_grad():
        sae.W_dec[3] = 0.0
    x = _acts(n=64)
    res = standard_sae_step(sae, x, 1.0)
    assert all(torch.isfinite(g).all() for g in res.grads.values())
    g = 2 * (res.reconstruction - x) / len(x)
    assert res.firing_counts[3] > 0  # the feature fires, so its reconstruction gradient is live
    # only the reconstruction term is left for that row (the L1 term's subgradient is 0)
    assert torch.allclose(res.grads["W_dec"][3], res.feature_acts[:, 3] @ g, atol=1e-6)


def test_auto_chooses_the_fused_step_for_standard_and_the_sparse_step_for_sparse_topk():
    assert SAETrainingConfig().step == "fused"
    assert SAETrainingConfig(architecture="topk", width=512, k=64).step == "sparse"
    assert SAETrainingConfig(architecture="batchtopk", width=512, k=32).step == "sparse"
    assert SAETrainingConfig(architecture="topk", width=512, k=65).step == "sae-lens"  # > 1/8
    assert SAETrainingConfig(architecture="jumprelu").step == "sae-lens"
    assert SAETrainingConfig(compile=True).step == "sae-lens"
    assert SAETrainingConfig(trainer="sae-lens").step == "sae-lens"
    with pytest.raises(ValueError, match="standard"):
        SAETrainingConfig(architecture="topk", trainer="fused")
    with pytest.raises(ValueError, match="TopK and BatchTopK"):
        SAETrainingConfig(architecture="standard", trainer="sparse")
    with pytest.raises(ValueError, match="choose one of"):
        SAETrainingConfig(trainer="fast")


def test_l1_coefficient_may_be_a_tensor():
    """The CUDA graph feeds the (warming-up) L1 coefficient as a 0-d tensor: same step."""
    torch.manual_seed(0)
    sae = make_training_sae(SAETrainingConfig(width=32), 12, 100, "h", "m")
    x = _acts(n=64)
    a = standard_sae_step(sae, x, 0.3)
    b = standard_sae_step(sae, x, torch.tensor(0.3))
    for name in a.grads:
        assert torch.allclose(a.grads[name], b.grads[name], rtol=1e-6, atol=1e-8), name
    assert torch.allclose(a.losses["l1_loss"], b.losses["l1_loss"], rtol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("autocast", [False, True])
def test_cuda_graph_training_equals_eager_training(autocast, monkeypatch):
    """The replayed graph runs the eager step's kernels: the same SAE, in float32 and bf16."""
    import sae_training.fused as fused

    acts = _acts(n=8192, d=64).cuda()
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    common = dict(
        width=256, l1_coefficient=0.5, lr=3e-3, batch_size=512, epochs=3, seed=2, device="cuda"
    )
    runs = {}
    for graphed in (True, False):
        monkeypatch.setattr(fused.fused_trainer_class(), "use_cuda_graph", graphed)
        runs[graphed] = train_sae(acts, SAETrainingConfig(**common, autocast=autocast), "h", "m")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        a, b = getattr(runs[True], name), getattr(runs[False], name)
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), (name, (a - b).abs().max())
    assert runs[True].cfg.metadata.l0 == pytest.approx(runs[False].cfg.metadata.l0, rel=1e-5)

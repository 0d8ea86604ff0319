"""The random-dictionary control is built like the dictionary it controls for."""

import torch

from sae_training.train import SAETrainingConfig, make_training_sae
from sae_training.train import random_sae as _random_sae


def test_random_control_copies_architecture_and_whitening():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 8, generator=g) @ torch.randn(8, 8, generator=g) + 2.0
    mean = x.double().mean(0)
    lam, vecs = torch.linalg.eigh(torch.cov(x.double().T))
    whitening = {
        "mean": mean,
        "matrix": vecs * lam.rsqrt(),
        "inverse_matrix": lam.sqrt()[:, None] * vecs.T,
    }
    plain = _random_sae(8, 32, seed=3)
    folded = _random_sae(8, 32, seed=3, whitening=whitening)
    z = ((x.double() - mean) @ whitening["matrix"]).float()  # whitened activations
    with torch.no_grad():
        # the folded random SAE on raw activations = the same random SAE on whitened ones
        assert torch.allclose(folded.encode(x), plain.encode(z), atol=1e-4)
        assert not torch.allclose(plain.encode(x), plain.encode(z), atol=1e-2)
    topk = make_training_sae(SAETrainingConfig(width=32, architecture="topk", k=5), 8, 1, "h", "m")
    control = _random_sae(8, 32, seed=3, like=topk)
    assert control.cfg.architecture() == "topk" and control.cfg.k == 5
    assert (control.encode(x) > 0).sum(1).max() <= 5

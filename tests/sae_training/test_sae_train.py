import pytest
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


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu"])
def test_other_architectures_train_and_load_identically(arch, tmp_path):
    acts, _ = _sparse_data(n=3000)
    cfg = SAETrainingConfig(
        width=48, architecture=arch, k=4, l1_coefficient=0.5, lr=1e-2, batch_size=256, epochs=20
    )
    sae = train_sae(acts, cfg, "blocks.0.hook_resid_post", "synthetic", out_dir=tmp_path / arch)
    m = evaluate_sae(sae, acts)
    # about 2.6 planted directions are active per row
    assert m["explained_variance"] > 0.8 and m["l0"] < 4.5, m
    if arch == "topk":
        assert m["l0"] <= 4 + 1e-9
    loaded = SAE.load_from_disk(str(tmp_path / arch))
    if arch == "batchtopk":
        # sae-lens saves BatchTopK as JumpReLU with a learned threshold (inference needs no batch):
        # the saved SAE keeps the quality and sparsity, not the batch-dependent outputs
        assert loaded.cfg.architecture() == "jumprelu"
        m_loaded = evaluate_sae(loaded, acts)
        assert m_loaded["explained_variance"] > 0.8 and abs(m_loaded["l0"] - 4) < 1.0, m_loaded
    else:
        with torch.no_grad():
            assert torch.allclose(loaded(acts[:200]), sae(acts[:200]), atol=1e-5)


@pytest.mark.parametrize("normalize", ["expected_average_only_in", "covariance_whitening"])
def test_interrupted_training_resumes_to_the_same_weights(tmp_path, normalize):
    from sae_training.train import _complete_checkpoints

    acts, _ = _sparse_data(n=4096)
    cfg = SAETrainingConfig(
        width=32,
        l1_coefficient=1.0,
        lr=3e-3,
        batch_size=256,
        epochs=4,
        n_checkpoints=3,
        normalize=normalize,
    )
    reference = train_sae(
        acts, cfg, "h", "m", out_dir=tmp_path / "ref", checkpoint_dir=tmp_path / "ref_ckpt"
    )
    assert not (tmp_path / "ref_ckpt").exists()  # checkpoints are cleaned up after the final save

    import sae_lens.training.sae_trainer as trainer_mod

    original = trainer_mod.SAETrainer._checkpoint_if_needed
    calls = {"n": 0}

    def crash_after_second_checkpoint(self):
        before = len(self.checkpoint_thresholds)
        original(self)
        if len(self.checkpoint_thresholds) < before:
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt("simulated kill")

    trainer_mod.SAETrainer._checkpoint_if_needed = crash_after_second_checkpoint
    try:
        with pytest.raises(KeyboardInterrupt):
            train_sae(
                acts, cfg, "h", "m", out_dir=tmp_path / "run", checkpoint_dir=tmp_path / "ckpt"
            )
    finally:
        trainer_mod.SAETrainer._checkpoint_if_needed = original
    assert len(_complete_checkpoints(tmp_path / "ckpt")) == 2 and not (tmp_path / "run").exists()
    resumed = train_sae(
        acts, cfg, "h", "m", out_dir=tmp_path / "run", checkpoint_dir=tmp_path / "ckpt"
    )
    assert torch.allclose(resumed.W_dec, reference.W_dec, atol=1e-6)
    assert torch.allclose(resumed.W_enc, reference.W_enc, atol=1e-6)


def test_whitened_sae_takes_raw_activations_and_saves_its_whitening(tmp_path):
    """PCA whitening (sae-lens's covariance_whitening) is folded into the saved weights; the
    whitening itself is saved beside them (random controls in the same space need it)."""
    from sae_training.train import load_whitening

    acts, dirs = _sparse_data()
    acts = acts * torch.linspace(0.3, 3.0, acts.shape[1])  # unequal variances
    cfg = SAETrainingConfig(
        width=64,
        l1_coefficient=0.3,
        lr=1e-2,
        batch_size=256,
        epochs=30,
        normalize="covariance_whitening",
    )
    sae = train_sae(acts, cfg, "blocks.0.hook_resid_post", "synthetic", out_dir=tmp_path / "w")
    loaded = SAE.load_from_disk(str(tmp_path / "w"))
    assert loaded.cfg.normalize_activations == "none"  # folded: raw activations in and out
    m = evaluate_sae(loaded, acts)
    assert m["explained_variance"] > 0.8, m
    with torch.no_grad():
        assert torch.allclose(loaded(acts[:100]), sae(acts[:100]), atol=1e-4)
    w = load_whitening(tmp_path / "w")
    z = (acts.double() - w["mean"]) @ w["matrix"]
    cov = torch.cov(z.T)
    assert torch.allclose(cov, torch.eye(cov.shape[0], dtype=cov.dtype), atol=0.1)
    assert torch.allclose(
        w["matrix"] @ w["inverse_matrix"], torch.eye(16, dtype=cov.dtype), atol=1e-6
    )
    assert load_whitening(tmp_path) is None


def test_checkpoint_without_its_whitening_file_is_incomplete(tmp_path):
    """sae-lens writes the whitening matrices after the scaler's json: a checkpoint cut between
    the two must not be resumed from (it would train on without whitening)."""
    import json

    import torch
    from sae_lens.constants import (
        ACTIVATION_SCALER_CFG_FILENAME,
        ACTIVATION_WHITENING_FILENAME,
        SAE_WEIGHTS_FILENAME,
        TRAINER_STATE_FILENAME,
    )
    from safetensors.torch import save_file

    from sae_training.train import _complete_checkpoints

    def write_safetensors(path):
        save_file({"W": torch.randn(64, 64)}, str(path))
        return path.read_bytes()

    for name, whitened in (("100", False), ("200", True), ("300", None)):
        p = tmp_path / name
        p.mkdir()
        (p / TRAINER_STATE_FILENAME).write_bytes(b"x")
        write_safetensors(p / SAE_WEIGHTS_FILENAME)
        scaler = {"scaling_factor": None, "has_whitening": whitened}
        # "300": the scaler's json itself cut mid-write
        text = json.dumps(scaler) if whitened is not None else '{"scaling_fac'
        (p / ACTIVATION_SCALER_CFG_FILENAME).write_text(text)
    assert [p.name for p in _complete_checkpoints(tmp_path)] == ["100"]
    whitening = tmp_path / "200" / ACTIVATION_WHITENING_FILENAME
    data = write_safetensors(whitening)
    assert [p.name for p in _complete_checkpoints(tmp_path)] == ["100", "200"]
    whitening.write_bytes(data[: len(data) // 3])  # cut while sae-lens wrote it in place
    assert [p.name for p in _complete_checkpoints(tmp_path)] == ["100"]


def test_checkpoints_resume_only_the_run_that_wrote_them(tmp_path):
    """An interrupted run's checkpoints, then a rerun with another L1 or other data into the same
    folder: refused, naming what changed (it would otherwise continue the old run silently)."""
    import pytest
    import torch

    from sae_training.train import SAETrainingConfig, train_sae

    g = torch.Generator().manual_seed(0)
    acts = torch.randn(1024, 8, generator=g)
    cfg = SAETrainingConfig(width=16, batch_size=128, epochs=1.0, n_checkpoints=2)
    ckpt = tmp_path / "ckpt"
    train_sae(acts, cfg, "h", "m", checkpoint_dir=ckpt)  # no out_dir: checkpoints stay
    assert (ckpt / "origin.json").exists()
    train_sae(acts, cfg, "h", "m", checkpoint_dir=ckpt)  # the same run: resumes
    other = SAETrainingConfig(**{**cfg.__dict__, "l1_coefficient": 3.0})
    with pytest.raises(ValueError, match=r"another run \(differs in: l1_coefficient\)"):
        train_sae(acts, other, "h", "m", checkpoint_dir=ckpt)
    with pytest.raises(ValueError, match=r"differs in: activations"):
        train_sae(acts + 1.0, cfg, "h", "m", checkpoint_dir=ckpt)
    # how the run executes may change between an interruption and its resume
    other = SAETrainingConfig(**{**cfg.__dict__, "trainer": "sae-lens", "autocast": True})
    train_sae(acts, other, "h", "m", checkpoint_dir=ckpt)
    # checkpoints with no record of their run are not adopted
    (ckpt / "origin.json").unlink()
    with pytest.raises(ValueError, match="no record of the run"):
        train_sae(acts, cfg, "h", "m", checkpoint_dir=ckpt)

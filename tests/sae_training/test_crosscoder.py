"""Crosscoders (sae_training.crosscoder) and their diffing measures (irmlens.diff.crosscoder) on
a planted pair whose answer is known: a direction only the RLHF model uses, and a null model that
differs from the base by noise only."""

import pytest
import torch

from irmlens.diff.crosscoder import (
    closed_form_beta,
    crosscoder_diff,
    decoder_cosine,
    latent_scaling,
    relative_norm,
    tag_latents,
    tuned_specific,
)
from sae_training.crosscoder import (
    Crosscoder,
    CrosscoderConfig,
    CrosscoderReading,
    evaluate_crosscoder,
    load_crosscoder,
    save_crosscoder,
    stack_models,
    train_crosscoder,
)

D, N_SHARED = 16, 24


def planted_pair(n: int = 24000, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Base: sparse combinations of 24 shared unit directions. RLHF: the same plus a planted
    direction on 10% of the tokens. Null: the base plus small noise."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(N_SHARED + 1, D, generator=g)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    on = torch.rand(n, N_SHARED, generator=g) < 0.1
    codes = on * (1 + 2 * torch.rand(n, N_SHARED, generator=g))
    base = codes @ dirs[:N_SHARED]
    planted_code = (torch.rand(n, generator=g) < 0.1) * (1 + 2 * torch.rand(n, generator=g))
    rlhf = base + planted_code[:, None] * dirs[N_SHARED]
    null = base + 0.02 * torch.randn(n, D, generator=g)
    return {"base": base, "rlhf": rlhf, "null": null}, dirs[N_SHARED]


@pytest.fixture(scope="module")
def trained():
    acts, planted = planted_pair(n=12000)
    cfg = CrosscoderConfig(width=64, k=4, lr=1e-2, batch_size=256, epochs=15, seed=0)
    cc, log = train_crosscoder(acts, cfg, log_every=20)
    return cc, log, acts, planted


def test_planted_direction_is_one_rlhf_only_latent_and_null_has_none(trained):
    cc, log, acts, planted = trained
    x = torch.stack(list(acts.values()), dim=1)
    rlhf_dec = cc.W_dec.detach()[1]
    cos = torch.nn.functional.cosine_similarity(rlhf_dec, planted[None], dim=-1)
    j = int(cos.argmax())
    assert float(cos[j]) > 0.95, float(cos[j])
    delta = relative_norm(cc, base=0, tuned=1)
    assert tag_latents(delta)[j] == "tuned_only", float(delta[j])
    scaling = latent_scaling(cc, x, base=0, tuned=1)
    assert bool(tuned_specific(delta, scaling)[j]), {k: float(v[j]) for k, v in scaling.items()}
    # exactly one latent is the planted one: no other live latent is RLHF-only
    fired = (cc.encode(x) > 0).any(0)
    rlhf_only = (delta >= 0.9) & fired
    assert rlhf_only.nonzero().flatten().tolist() == [j]
    # the null model differs from the base by noise only: no live latent is null-only
    null_delta = relative_norm(cc, base=0, tuned=2)
    assert not bool(((null_delta >= 0.9) & fired).any()), null_delta[fired].max()
    # shared latents read the same direction in both models
    shared = (torch.tensor([t == "shared" for t in tag_latents(delta)])) & fired
    assert shared.sum() >= N_SHARED // 2 and float(decoder_cosine(cc)[shared].mean()) > 0.95


def test_batchtopk_evals_and_calibrated_threshold(trained):
    cc, log, acts, _ = trained
    m = evaluate_crosscoder(cc, acts)
    assert abs(m["l0"] - 4) < 0.5, m["l0"]  # the threshold gives the trained k on average
    for name in ("base", "rlhf", "null"):
        assert m["per_model"][name]["explained_variance"] > 0.9, m
    assert log["steps"] == 15 * (12000 // 256)
    assert log["history"][-1]["error"] < 0.5 * log["history"][0]["error"], log["history"]


def test_save_and_load_are_bit_identical_and_checked(trained, tmp_path):
    cc, _, acts, _ = trained
    out = save_crosscoder(cc, tmp_path / "cc", list(acts), "blocks.1.hook_resid_post", {"x": 1})
    back, cfg = load_crosscoder(out)
    assert cfg["models"] == ["base", "rlhf", "null"] and cfg["architecture"] == "batchtopk"
    for k, v in cc.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    x = torch.stack(list(acts.values()), dim=1)[:100]
    assert torch.equal(cc(x), back(x))
    weights = out / "crosscoder.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(Exception, match="sha256"):
        load_crosscoder(out)


def test_l1_crosscoder_trains_and_sparsifies():
    acts, _ = planted_pair(n=12000, seed=1)
    cfg = CrosscoderConfig(
        width=64, architecture="l1", l1_coefficient=0.05, lr=3e-3, batch_size=512, epochs=4
    )
    cc, _ = train_crosscoder({"base": acts["base"], "rlhf": acts["rlhf"]}, cfg)
    m = evaluate_crosscoder(cc, {"base": acts["base"], "rlhf": acts["rlhf"]})
    assert m["per_model"]["rlhf"]["explained_variance"] > 0.8, m
    assert m["l0"] < 32, m  # the decoder-norm-weighted L1 penalty makes codes sparse


def test_latent_scaling_recovers_known_betas_on_a_constructed_crosscoder():
    """f = ReLU(x_base) exactly; the tuned decoder is the identity and the base decoder scales
    latent j by beta_j, and x_tuned = alpha * x_base: every beta is known in closed form."""
    d = 6
    beta = torch.tensor([0.0, 0.25, 0.5, 1.0, 1.5, -0.5])
    alpha = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0, 4.0])
    cc = Crosscoder(2, d, d, architecture="l1")
    with torch.no_grad():
        cc.W_enc[0] = torch.eye(d)
        cc.W_dec[1] = torch.eye(d)
        cc.W_dec[0] = torch.diag(beta)
    g = torch.Generator().manual_seed(0)
    xb = torch.rand(5000, d, generator=g) * (torch.rand(5000, d, generator=g) < 0.3)
    x = torch.stack([xb, alpha * xb], dim=1)
    s = latent_scaling(cc, x, base=0, tuned=1)
    assert torch.allclose(s["beta_reconstruction_base"], beta, atol=1e-5)
    assert torch.allclose(s["beta_reconstruction_tuned"], torch.ones(d), atol=1e-5)
    # error targets put latent j's own contribution back: base error + beta_j f_j = f_j
    assert torch.allclose(s["beta_error_base"], torch.ones(d), atol=1e-5)
    assert torch.allclose(s["beta_error_tuned"], alpha, atol=1e-5)
    assert torch.allclose(s["nu_error"], 1 / alpha, atol=1e-5)


def test_closed_form_beta_is_the_least_squares_solution():
    g = torch.Generator().manual_seed(3)
    f = torch.rand(400, generator=g)
    v = torch.randn(8, generator=g)
    y = 0.7 * f[:, None] * v + 0.1 * torch.randn(400, 8, generator=g)
    beta = closed_form_beta((f[:, None] * y).sum(0)[None], (f**2).sum()[None], v[None])[0]
    lstsq = torch.linalg.lstsq((f[:, None] * v).reshape(-1, 1), y.reshape(-1, 1)).solution
    assert float(beta) == pytest.approx(float(lstsq), abs=1e-5)
    assert torch.isnan(closed_form_beta(torch.zeros(1, 8), torch.zeros(1), v[None]))[0]


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="architecture"):
        CrosscoderConfig(architecture="topk")
    with pytest.raises(ValueError, match="exceeds its width"):
        CrosscoderConfig(width=8, k=16)
    with pytest.raises(ValueError, match="one shape for every model"):
        train_crosscoder({"a": torch.zeros(10, 4), "b": torch.zeros(11, 4)}, CrosscoderConfig())


def _paired_cache(path, make_hooked, n_rows: int) -> None:
    """A paired cache of two small random models' layer-1 residuals on random tokens."""
    from irmlens.cache.capture import build_paired_cache
    from irmlens.cache.tokens import TokenRows

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 100, (n_rows, 16), generator=g)
    rows = TokenRows(
        tokens, torch.ones_like(tokens, dtype=torch.bool), -torch.ones_like(tokens), []
    )
    models = {"base": make_hooked(0), "rlhf": make_hooked(1)}
    build_paired_cache(models, rows, [1], path, {}, dtype="float32", shard_rows=n_rows // 2)


def test_sae_train_cli_trains_a_crosscoder_on_a_paired_cache(tmp_path, make_hooked, capsys):
    from sae_training.cli import main

    _paired_cache(tmp_path / "cache", make_hooked, n_rows=40)
    out = tmp_path / "cc"
    args = ["--cache", str(tmp_path / "cache"), "--model", "base", "--model", "rlhf"]
    args += ["--hook", "blocks.1.hook_resid_post", "--width", "4x", "--k", "8"]
    args += ["--batch-size", "128", "--epochs", "2", "--out", str(out)]
    assert main(args + ["--arch", "crosscoder-batchtopk"]) == 0
    assert "explained variance base" in capsys.readouterr().out
    cc, cfg = load_crosscoder(out)
    assert (cc.n_models, cc.width, cfg["hook_name"]) == (2, 64, "blocks.1.hook_resid_post")
    one = [
        "--cache",
        str(tmp_path / "cache"),
        "--model",
        "base",
        "--hook",
        "blocks.1.hook_resid_post",
    ]
    with pytest.raises(SystemExit):  # argparse: a crosscoder needs two models or more
        main(one + ["--arch", "crosscoder-l1", "--out", str(tmp_path / "x")])
    assert "--model twice or more" in capsys.readouterr().err


def test_a_crosscoder_on_the_null_pair_alone_has_no_tuned_only_latent():
    acts, _ = planted_pair(n=6000, seed=2)
    pair = {"base": acts["base"], "null": acts["null"]}
    cfg = CrosscoderConfig(width=64, k=4, lr=1e-2, batch_size=256, epochs=15, seed=0)
    cc, _ = train_crosscoder(pair, cfg)
    x = torch.stack(list(pair.values()), dim=1)
    fired = (cc.encode(x) > 0).any(0)
    delta = relative_norm(cc, base=0, tuned=1)
    assert fired.sum() >= N_SHARED // 2
    assert float(delta[fired].max()) < 0.9 and float(delta[fired].min()) > 0.1, delta[fired]


def _planted_latent(cc, planted) -> int:
    cos = torch.nn.functional.cosine_similarity(cc.W_dec.detach()[1], planted[None], dim=-1)
    return int(cos.argmax())


def test_crosscoder_diff_tags_the_planted_latent_and_no_live_null_latent(trained):
    cc, _, acts, planted = trained
    out = crosscoder_diff(cc, stack_models(acts), list(acts))
    j = _planted_latent(cc, planted)
    r, n = out["pairs"]["rlhf"], out["pairs"]["null"]
    assert r["tuned_only_latents"] == [j] and r["tuned_specific_latents"] == [j]
    assert r["tag_counts"]["tuned_only"] == 1 and r["tag_counts"]["shared"] >= N_SHARED // 2
    assert n["tag_counts"]["tuned_only"] == 0 and n["n_tuned_specific"] == 0
    assert sum(r["relative_norm_histogram"]) == cc.width == len(r["nu_error"])
    assert sum(r["tag_counts"].values()) == cc.width
    assert out["thresholds"]["tuned_only_min"] == 0.9


def test_reading_the_change_tracks_the_plant_and_copying_the_input_would_not(trained):
    """The IRM's crosscoder space: f(x) - f(x with the RLHF slot given the base's activation), on
    the planted latent, follows the planted code (the rlhf - base difference along the planted
    direction). Encoding each model's activation copied into every slot, the obvious alternative,
    leaves the planted latent silent: why the IRM does not read it that way."""
    cc, _, acts, planted = trained
    n = 3000
    few = {m: a[:n] for m, a in acts.items()}
    reading = CrosscoderReading(cc, list(acts))
    change = reading.change(few, "rlhf")
    j = _planted_latent(cc, planted)
    plant = (few["rlhf"] - few["base"]) @ planted
    assert float(torch.corrcoef(torch.stack([change[:, j], plant]))[0, 1]) > 0.9
    # the null model's change reads no planted latent; a subset keeps its columns in order
    assert float(reading.change(few, "null")[:, j].abs().max()) < 0.1 * float(change[:, j].max())
    sub = CrosscoderReading(cc, list(acts), [j, 2])
    assert torch.equal(sub.change(few, "rlhf"), change[:, [j, 2]])
    assert sub.cfg.d_sae == 2 and sub.latent_id(0) == j and reading.latent_id(7) == 7
    copied = cc.encode(few["rlhf"][:, None].expand(-1, cc.n_models, -1))
    assert float((copied[:, j] > 0).float().mean()) < 0.5 * float((plant > 0).float().mean())


def test_interrupted_crosscoder_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    import sae_training.crosscoder as module

    acts, _ = planted_pair(n=4096, seed=3)
    cfg = CrosscoderConfig(width=32, k=4, lr=1e-2, batch_size=256, epochs=4, n_checkpoints=3)
    reference, ref_log = train_crosscoder(acts, cfg)
    ckpt = tmp_path / "ckpt"
    original, calls = module._write_checkpoint, []

    def crash_after_second_checkpoint(*args):
        original(*args)
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(module, "_write_checkpoint", crash_after_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train_crosscoder(acts, cfg, checkpoint_dir=ckpt)
    monkeypatch.setattr(module, "_write_checkpoint", original)
    assert calls == [16, 32] and sorted(p.name for p in ckpt.iterdir()) == [
        "16",
        "32",
        "origin.json",
    ]
    resumed, log = train_crosscoder(acts, cfg, checkpoint_dir=ckpt)
    assert log["resumed_from_step"] == 32 and log["steps"] == ref_log["steps"] == 64
    for name, a in reference.state_dict().items():
        assert torch.allclose(a, resumed.state_dict()[name], atol=1e-6), name
    assert log["final_loss"] == pytest.approx(ref_log["final_loss"], rel=1e-5)
    # other settings into the same checkpoint folder: refused, not silently continued
    from sae_training.train import TrainingInputError

    with pytest.raises(TrainingInputError, match="differs in: k"):
        train_crosscoder(acts, CrosscoderConfig(**{**cfg.__dict__, "k": 8}), checkpoint_dir=ckpt)
    (ckpt / ".48.abc123.tmp").mkdir()  # what a write killed mid-checkpoint leaves
    module.remove_checkpoints(ckpt)
    assert not ckpt.exists()


# L1 under DDP is slow-marked (make test keeps BatchTopK, whose global top-k is the hard part)
@pytest.mark.parametrize(
    "arch", ["crosscoder-batchtopk", pytest.param("crosscoder-l1", marks=pytest.mark.slow)]
)
def test_two_process_ddp_crosscoder_matches_one_process(tmp_path, make_hooked, arch):
    """torchrun with 2 processes (gloo): each takes half of every batch, and the batch top-k,
    dead-latent counts and auxiliary-loss variance are global, so the crosscoder is the same."""
    import subprocess
    import sys

    _paired_cache(tmp_path / "cache", make_hooked, n_rows=64)
    common = ["-m", "sae_training.cli", "--cache", str(tmp_path / "cache"), "--model", "base"]
    common += ["--model", "rlhf", "--hook", "blocks.1.hook_resid_post", "--width", "4x"]
    # L1: a coefficient that leaves latents alive on this small cache (a dead crosscoder's
    # near-zero gradients would make the comparison meaningless). BatchTopK: lr 1e-3, since at
    # 1e-2 a near-tie at the batch's k-th value, decided differently by the rounding of a
    # 64-row and a 128-row matmul, flips one selection and the runs drift apart (0.03 in W_enc)
    lr = "1e-3" if arch.endswith("batchtopk") else "1e-2"
    common += ["--k", "8", "--l1", "0.002", "--lr", lr, "--batch-size", "128"]
    common += ["--epochs", "4", "--arch", arch]
    common += ["--checkpoints", "2", "--device", "cpu"]
    one = subprocess.run(
        [sys.executable, *common, "--out", str(tmp_path / "one")], capture_output=True, text=True
    )
    assert one.returncode == 0, one.stderr[-2000:]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    two = subprocess.run(
        [*launch, *common, "--out", str(tmp_path / "two")], capture_output=True, text=True
    )
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    a, _ = load_crosscoder(tmp_path / "one")
    b, _ = load_crosscoder(tmp_path / "two")
    for name, w in a.state_dict().items():
        assert torch.allclose(w, b.state_dict()[name], atol=1e-4, rtol=1e-4), (
            name,
            (w - b.state_dict()[name]).abs().max(),
        )
    assert float(one.stdout.rsplit("dead ", 1)[1].split()[0]) < 0.5, one.stdout  # live latents
    assert not (tmp_path / ".one.checkpoints").exists()  # removed once the crosscoder is saved

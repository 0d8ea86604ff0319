"""The sparse TopK/BatchTopK steps (sae_training/sparse.py) against the dense computations: sae-lens's
autograd step for SAEs, our dense crosscoder step, and the dense products for the kernels."""

from pathlib import Path

import pytest
import torch
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import TrainStepInput

from sae_training import sparse
from sae_training.crosscoder import Crosscoder, CrosscoderConfig, _dense_step, _sparse_step
from sae_training.train import SAETrainingConfig, train_sae

REPO = Path(__file__).resolve().parents[2]


def _pattern(n_rows=37, n_cols=53, per_row=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(n_rows, n_cols, generator=g).topk(per_row, dim=1).indices
    rows, cols = sparse._row_entries(idx)
    return sparse.Pattern.from_entries(rows, cols, n_rows, n_cols)


def test_the_three_products_equal_dense_matrix_products():
    p = _pattern()
    g = torch.Generator().manual_seed(1)
    values = torch.randn(p.nnz, generator=g)
    dense = p.to_dense(values)
    w, x, a = (torch.randn(s, generator=g) for s in ((53, 9), (37, 9), (37, 9)))
    assert torch.allclose(sparse.spmm(p, values, w), dense @ w, atol=1e-5)
    assert torch.allclose(sparse.spmm_t(p, values, x), dense.T @ x, atol=1e-5)
    assert torch.allclose(sparse.sddmm(p, a, w), (a @ w.T)[p.rows, p.cols], atol=1e-5)


def test_batch_topk_entries_are_the_flat_top_k_even_when_one_row_holds_most():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, 300, generator=g)
    h[7] += 10.0  # row 7 holds far more than 4x the mean share: the search must widen
    h[:, :5] -= 20.0
    for n_keep in (64 * 8, 64 * 40, 64 * 300):
        rows, cols = sparse.batch_topk_entries(h, n_keep)
        expected = torch.zeros(h.numel(), dtype=torch.bool)
        expected[h.relu().flatten().topk(n_keep).indices] = True
        got = torch.zeros(h.numel(), dtype=torch.bool)
        got[rows * 300 + cols] = True
        # a flat top-k may pick any of the zeros (ties) once fewer than n_keep entries are > 0
        positive = h.flatten() > 0
        assert torch.equal(got & positive, expected & positive), n_keep
        assert got.sum() == n_keep and bool((rows[1:] >= rows[:-1]).all())
    assert (torch.bincount(sparse.batch_topk_entries(h, 64 * 8)[0]) > 32).sum() >= 1


def _sae(arch, rescale, width, seed=0, apply_b_dec=True):
    torch.manual_seed(seed)
    cls, cfg_cls = get_sae_training_class(arch)
    sae = cls(
        cfg_cls(
            d_in=24,
            d_sae=width,
            k=8,
            rescale_acts_by_decoder_norm=rescale,
            normalize_activations="none",
            apply_b_dec_to_input=apply_b_dec,
        )
    )
    with torch.no_grad():  # non-trivial biases and decoder norms, so every term is exercised
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        sae.W_dec.mul_(torch.rand(width, 1) + 0.5)
    return sae


def _run(sae, x, dead, ours: bool, backend="torch", matmul_dtype=None):
    """(losses, gradients, reconstruction, dense feature acts, BatchTopK threshold after)."""
    sae.zero_grad()
    if ours:
        out = sparse.sparse_training_forward_pass(sae, x, dead, backend, matmul_dtype)
    else:
        step = TrainStepInput(
            sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0,
            is_logging_step=False,
        )  # fmt: skip
        out = sae.training_forward_pass(step)
    out.loss.backward()
    acts = out.feature_acts.to_dense() if out.feature_acts.is_sparse else out.feature_acts
    threshold = float(sae.topk_threshold) if hasattr(sae, "topk_threshold") else None
    losses = {k: float(v.detach()) for k, v in out.losses.items()}
    grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    return losses, grads, out.sae_out.detach(), acts.detach(), threshold


# (width, dead fraction): no dead latent; few dead latents (dense products over their columns);
# many (their entries join the sparse pattern: k_aux * DENSE_AUX_DENSITY < n_dead)
AUX_CASES = [(200, 0.0), (200, 0.3), (400, 0.5)]


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize(
    "rescale,apply_b_dec", [(True, True), (False, True), (True, False)], ids=str
)
@pytest.mark.parametrize("width,dead_fraction", AUX_CASES)
def test_gradients_equal_sae_lens_autograd(arch, rescale, apply_b_dec, width, dead_fraction):
    sae = _sae(arch, rescale, width, apply_b_dec=apply_b_dec)
    x = torch.randn(64, 24, generator=torch.Generator().manual_seed(1))
    dead = torch.rand(width, generator=torch.Generator().manual_seed(2)) < dead_fraction
    n_dead, k_aux = int(dead.sum()), 12
    assert (dead_fraction == 0) == (n_dead == 0)
    if width == 400:
        assert k_aux * sparse.DENSE_AUX_DENSITY < n_dead  # the sparse auxiliary path
    start = sae.topk_threshold.clone() if arch == "batchtopk" else None
    ref = _run(sae, x, dead, ours=False)
    if start is not None:
        sae.topk_threshold = start
    got = _run(sae, x, dead, ours=True)
    for name in ref[0]:
        assert abs(got[0][name] - ref[0][name]) <= 1e-5 * max(1.0, abs(ref[0][name])), name
    assert (ref[0]["auxiliary_reconstruction_loss"] > 0) == (n_dead > 0)
    for name, g in ref[1].items():
        assert torch.allclose(got[1][name], g, rtol=1e-5, atol=1e-5), (name, arch, rescale)
    assert torch.allclose(got[2], ref[2], atol=1e-5)
    assert torch.allclose(got[3], ref[3], atol=1e-5)
    if arch == "batchtopk":
        assert got[4] == pytest.approx(ref[4], rel=1e-6) and got[4] > 0


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_bf16_encoder_product_stays_close_to_float32(arch):
    """Autocast's form of the step (the encoder product the selection is made on in bf16, the
    rest float32): same loss to 2%, gradients aligned."""
    x = torch.randn(64, 24, generator=torch.Generator().manual_seed(1))
    dead = torch.rand(200, generator=torch.Generator().manual_seed(2)) < 0.3
    sae = _sae(arch, True, 200)
    start = sae.topk_threshold.clone() if arch == "batchtopk" else None
    exact = _run(sae, x, dead, ours=True)
    if start is not None:
        sae.topk_threshold = start
    low = _run(sae, x, dead, ours=True, matmul_dtype=torch.bfloat16)
    assert low[0]["mse_loss"] == pytest.approx(exact[0]["mse_loss"], rel=0.02)
    for name, g in exact[1].items():
        cos = torch.nn.functional.cosine_similarity(g.flatten(), low[1][name].flatten(), 0)
        assert cos > 0.95 and low[1][name].dtype == torch.float32, (name, cos)


def _acts(n=6144, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(60, d, generator=g), dim=1)
    codes = torch.rand(n, 60, generator=g) * (torch.rand(n, 60, generator=g) < 0.08)
    return codes @ dirs * 3 + 0.1 * torch.randn(n, d, generator=g)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_whole_sparse_training_runs_reach_sae_lens_loss(arch):
    """Whole runs (warm-up, cosine decay, clipping, Adam, scaling and its folding, dead-latent
    statistics and the auxiliary loss) reach the same held-out MSE through either step."""
    acts, heldout = _acts(), _acts(n=2048, seed=1)
    common = dict(width=256, architecture=arch, k=8, batch_size=256, epochs=3.0, lr=1e-2)
    mse = {}
    for trainer in ("sae-lens", "sparse"):
        sae = train_sae(acts, SAETrainingConfig(**common, trainer=trainer), "h", "m")
        with torch.no_grad():
            mse[trainer] = float(((sae.decode(sae.encode(heldout)) - heldout) ** 2).mean())
    baseline = float(heldout.var(0).sum() / heldout.shape[1])
    assert mse["sae-lens"] < 0.6 * baseline  # the runs learned something to compare
    assert abs(mse["sparse"] / mse["sae-lens"] - 1) < 0.01, mse


def test_crosscoder_sparse_step_gradients_equal_the_dense_step():
    torch.manual_seed(0)
    cc = Crosscoder(2, 16, 256, "batchtopk", k=8)
    cc.init_weights(1.0, seed=0)
    with torch.no_grad():
        cc.b_enc.normal_(0, 0.05)
        cc.W_dec.mul_(torch.rand(2, 256, 1) + 0.5)
    xs = torch.randn(128, 2, 16, generator=torch.Generator().manual_seed(1))
    grads = []
    for which in ("dense", "sparse"):
        cc.zero_grad()
        if which == "dense":
            f, x_hat, _ = _dense_step(cc, xs, None, 1)
            codes = f[f > 0]
        else:
            kept, codes, x_hat, _, _ = _sparse_step(cc, xs, None, 1, "torch")
            codes = codes[codes > 0]
        loss = torch.linalg.norm(xs - x_hat, dim=-1).mean()
        loss.backward()
        grads.append((float(loss.detach()), {n: p.grad.clone() for n, p in cc.named_parameters()}))
        assert codes.numel() > 0
    (loss_d, g_d), (loss_s, g_s) = grads
    assert loss_s == pytest.approx(loss_d, rel=1e-6)
    for name in g_d:
        assert torch.allclose(g_s[name], g_d[name], rtol=1e-5, atol=1e-6), name


def test_crosscoder_auto_trainer_takes_the_sparse_step_and_trains_as_well():
    assert CrosscoderConfig(width=512, k=32).sparse_step
    assert not CrosscoderConfig(width=128, k=32).sparse_step
    assert not CrosscoderConfig(architecture="l1").sparse_step
    with pytest.raises(ValueError, match="BatchTopK"):
        CrosscoderConfig(architecture="l1", trainer="sparse")
    from sae_training.crosscoder import evaluate_crosscoder, train_crosscoder

    acts = {"a": _acts(n=4096), "b": _acts(n=4096) * 1.1}
    ev = {}
    for trainer in ("dense", "sparse"):
        cfg = CrosscoderConfig(width=256, k=8, batch_size=256, epochs=4.0, lr=1e-2, trainer=trainer)
        cc, _ = train_crosscoder(acts, cfg)
        per_model = evaluate_crosscoder(cc, acts)["per_model"].values()
        ev[trainer] = sum(1 - m["explained_variance"] for m in per_model) / len(per_model)
    fvu = ev  # fraction of variance unexplained, averaged over the models
    assert fvu["dense"] < 0.5 and abs(fvu["sparse"] / fvu["dense"] - 1) < 0.02, fvu


_INTERPRETED = """
import torch
from sae_lens.registry import get_sae_training_class
from sae_training import sparse
from tests.sae_training.test_sparse import _pattern, _run, _sae

p = _pattern()
g = torch.Generator().manual_seed(1)
values = torch.randn(p.nnz, generator=g)
w, x, a = (torch.randn(s, generator=g) for s in ((53, 9), (37, 9), (37, 9)))
for fn, args in ((sparse.spmm, (values, w)), (sparse.spmm_t, (values, x)), (sparse.sddmm, (a, w))):
    assert torch.allclose(fn(p, *args, backend="triton"), fn(p, *args), atol=1e-5), fn.__name__
for arch in ("topk", "batchtopk"):
    for width, frac in ((200, 0.3), (400, 0.5)):
        sae = _sae(arch, True, width)
        x = torch.randn(64, 24, generator=torch.Generator().manual_seed(1))
        dead = torch.rand(width, generator=torch.Generator().manual_seed(2)) < frac
        start = sae.topk_threshold.clone() if arch == "batchtopk" else None
        ref = _run(sae, x, dead, ours=True, backend="torch")
        if start is not None:
            sae.topk_threshold = start
        got = _run(sae, x, dead, ours=True, backend="triton")
        for name, grad in ref[1].items():
            assert torch.allclose(got[1][name], grad, rtol=1e-5, atol=1e-6), (arch, name)
print("triton == torch")
"""


@pytest.mark.skipif(sparse.triton is None, reason="Triton not installed (pip install triton)")
def test_triton_kernels_match_torch_in_the_interpreter(triton_interpreter):
    """The real kernel source on CPU via TRITON_INTERPRET=1 (read when the kernels are defined)."""
    assert "triton == torch" in triton_interpreter(_INTERPRETED)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_triton_kernels_match_torch_on_cuda():  # pragma: no cover - GPU only
    p = _pattern()
    p = sparse.Pattern(*(t.cuda() if torch.is_tensor(t) else t for t in vars(p).values()))
    g = torch.Generator().manual_seed(1)
    values = torch.randn(p.nnz, generator=g).cuda()
    w, x, a = (torch.randn(s, generator=g).cuda() for s in ((53, 9), (37, 9), (37, 9)))
    for fn, args in ((sparse.spmm, (values, w)), (sparse.spmm_t, (values, x))):
        assert torch.allclose(fn(p, *args, backend="triton"), fn(p, *args), atol=1e-5)
    assert torch.allclose(sparse.sddmm(p, a, w, "triton"), sparse.sddmm(p, a, w), atol=1e-5)

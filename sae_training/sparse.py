"""Sparse training steps for TopK and BatchTopK dictionaries: decode and back-propagate through the
k active latents of each token only.

Why our own: sae-lens trains TopK and BatchTopK SAEs densely. It scatters the k kept
pre-activations into a ``[batch, width]`` matrix of zeros and multiplies that by the decoder, and
autograd then runs three more dense ``[batch, width]`` matrix products (the decoder's gradient, the
codes' gradient and the encoder's gradient). With k = 64 of 16,384 latents, over 99% of each
product is spent on zeros.

Here only the encoder's forward product stays dense: the top-k selection needs every
pre-activation. The rest runs on the ``batch * k`` kept entries. They are held as a sparse
``Pattern``: row-major CSR, plus the order of the transposed (latent-major) CSR.
- The decoder is a sparse-dense product: each token sums its k decoder rows.
- The decoder's gradient and the encoder's gradient are transposed sparse-dense products. Each
  latent sums the rows of the tokens it is active on.
- The codes' gradient is a sampled product (SDDMM): one dot product per kept entry.

Two autograd functions carry these, ``gather_codes`` (the encoder at the kept entries) and
``decode_codes``. Every other operation of the loss stays autograd's, on tensors of ``batch * k``
entries or ``[batch, d_in]``: the decoder-norm rescaling, the ReLU, the MSE, the dead-latent
auxiliary loss, a crosscoder's L2 error. So the gradients are the dense computation's up to
rounding (``tests/sae_training/test_sparse.py`` checks them against sae-lens's autograd to 1e-5).

The products run in torch's sparse CSR kernels (MKL on a CPU, cuSPARSE on CUDA), or in the three
Triton kernels below on CUDA. The Triton kernels are checked against the torch path through
Triton's interpreter on a CPU; the native check (``test_triton_kernels_match_torch_on_cuda``) has
not run yet, as no GPU was lent since they were written.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch

try:  # Triton is optional: CPU-only installs use torch's sparse kernels
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None


BACKENDS = ("torch", "triton")
# the auxiliary loss's k_aux codes among n_dead dead latents run as dense products over the dead
# columns while k_aux * DENSE_AUX_DENSITY >= n_dead: on a 2-core CPU the sparse products reach
# ~21 GFLOP/s (memory-bound row gathers) against ~275 for a dense product, a 13x gap
DENSE_AUX_DENSITY = 12


@dataclass
class Pattern:
    """Which (row, latent) entries are kept: ``rows`` sorted ascending, ``cols`` the latents.

    ``crow`` holds the row pointers of the row-major CSR. ``order`` sorts the entries by latent
    (stably, so rows stay ascending within each latent); ``ccol`` holds the latent pointers of
    that transposed CSR and ``rows_by_col`` its row indices. Every tensor is int64 on the codes'
    device."""

    rows: torch.Tensor
    cols: torch.Tensor
    n_rows: int
    n_cols: int
    crow: torch.Tensor
    order: torch.Tensor
    ccol: torch.Tensor
    rows_by_col: torch.Tensor

    @classmethod
    def from_entries(
        cls, rows: torch.Tensor, cols: torch.Tensor, n_rows: int, n_cols: int
    ) -> Pattern:
        """The pattern of entries ``(rows[i], cols[i])``, given in row-major order."""
        rows, cols = rows.long().contiguous(), cols.long().contiguous()
        crow = torch.zeros(n_rows + 1, dtype=torch.long, device=rows.device)
        crow[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
        order = torch.argsort(cols, stable=True)
        ccol = torch.zeros(n_cols + 1, dtype=torch.long, device=rows.device)
        ccol[1:] = torch.bincount(cols, minlength=n_cols).cumsum(0)
        return cls(rows, cols, n_rows, n_cols, crow, order, ccol, rows[order])

    @property
    def nnz(self) -> int:
        return self.rows.numel()

    def to_dense(self, values: torch.Tensor) -> torch.Tensor:
        """``[n_rows, n_cols]`` with ``values`` at the entries and 0 elsewhere (tests, logging)."""
        out = values.new_zeros(self.n_rows, self.n_cols)
        out[self.rows, self.cols] = values
        return out


# --- the three products ----------------------------------------------------------------------


def _csr(pointers, indices, values, shape) -> torch.Tensor:
    """A CSR tensor; torch's warning that CSR support is "beta" is silenced (our use is covered
    by tests/sae_training/test_sparse.py), and so are the invariant checks (the patterns are
    built canonical)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(pointers, indices, values, shape, check_invariants=False)


def _csr_mm(pointers, indices, values, shape, dense: torch.Tensor) -> torch.Tensor:
    """CSR ``[shape]`` times ``dense``, into a fresh tensor through ``addmm(out=)``: ~30% less
    time than ``torch.sparse.mm`` on a CPU, which zero-fills and copies its result once more
    (52 against 72 ms for 1.4M entries times a [8192, 576] matrix)."""
    csr = _csr(pointers, indices, values, shape)
    out = dense.new_empty(shape[0], dense.shape[1])
    return torch.addmm(out, csr, dense, beta=0.0, out=out)


def spmm(p: Pattern, values: torch.Tensor, w: torch.Tensor, backend: str = "torch"):
    """``out[r] = sum over r's entries (r, c) of values * w[c]``: ``[n_rows, w.shape[1]]``."""
    if backend == "triton":
        return _csr_rows_triton(p.crow, p.cols, values, w, p.n_rows)
    return _csr_mm(p.crow, p.cols, values, (p.n_rows, p.n_cols), w)


def spmm_t(p: Pattern, values: torch.Tensor, x: torch.Tensor, backend: str = "torch"):
    """``out[c] = sum over c's entries (r, c) of values * x[r]``: ``[n_cols, x.shape[1]]``."""
    values_by_col = values[p.order]
    if backend == "triton":
        return _csr_rows_triton(p.ccol, p.rows_by_col, values_by_col, x, p.n_cols)
    return _csr_mm(p.ccol, p.rows_by_col, values_by_col, (p.n_cols, p.n_rows), x)


def sddmm(p: Pattern, a: torch.Tensor, w: torch.Tensor, backend: str = "torch"):
    """``out[i] = a[rows[i]] . w[cols[i]]`` for each entry: ``[nnz]``."""
    if backend == "triton":
        return _sddmm_triton(p.rows, p.cols, a, w)
    zeros = a.new_zeros(p.nnz)
    pattern = _csr(p.crow, p.cols, zeros, (p.n_rows, p.n_cols))
    sampled = torch.sparse.sampled_addmm(pattern, a, w.T, beta=0.0)
    return sampled.values()


# --- the autograd functions ------------------------------------------------------------------


class _GatherCodes(torch.autograd.Function):
    """The encoder ``(x - shift) @ W_enc + b_enc`` at the pattern's entries. Its forward returns
    the values the caller took from the dense product the selection was made on (no second
    computation); its backward touches only those entries. ``shift`` (sae-lens's ``b_dec``
    subtracted from the input) gets ``-W_enc @ grad_b_enc``, so no ``[batch, d_in]`` gradient
    of the input is formed; ``x`` itself is data and gets none."""

    @staticmethod
    def forward(ctx, x, shift, w_enc, b_enc, values, p, backend):
        ctx.save_for_backward(x, shift, w_enc)
        ctx.p, ctx.backend = p, backend
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        x, shift, w_enc = ctx.saved_tensors
        p, backend = ctx.p, ctx.backend
        grad = grad.contiguous()
        grad_shift = grad_w = grad_b = None
        if ctx.needs_input_grad[2]:
            x_in = x if shift is None else x - shift
            grad_w = spmm_t(p, grad, x_in.contiguous(), backend).T
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
            grad_b = grad.new_zeros(p.n_cols).index_add_(0, p.cols, grad)
        if ctx.needs_input_grad[1]:
            # not ``w_enc @ grad_b``: MKL's matrix-vector product rounds differently with the
            # buffers' memory alignment (see sae_training.fused)
            grad_shift = -_columns_dot(w_enc, grad_b)
        return None, grad_shift, grad_w, grad_b, None, None, None


class _DecodeCodes(torch.autograd.Function):
    """``codes @ W_dec`` for codes held as values at the pattern's entries."""

    @staticmethod
    def forward(ctx, values, w_dec, p, backend):
        ctx.save_for_backward(values, w_dec)
        ctx.p, ctx.backend = p, backend
        return spmm(p, values.contiguous(), w_dec.contiguous(), backend)

    @staticmethod
    def backward(ctx, grad):
        values, w_dec = ctx.saved_tensors
        p, backend = ctx.p, ctx.backend
        grad = grad.contiguous()
        grad_v = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_v = sddmm(p, grad, w_dec.contiguous(), backend)
        if ctx.needs_input_grad[1]:
            grad_w = spmm_t(p, values.contiguous(), grad, backend)
        return grad_v, grad_w, None, None


def _columns_dot(w: torch.Tensor, v: torch.Tensor, block: int = 2048) -> torch.Tensor:
    """``(w * v).sum(1)`` in blocks of columns: the same fixed order of sums on every call, and
    temporaries small enough for the allocator to reuse (a [576, 16384] temporary is fresh
    memory on every call, ~50 ms of page faults on a CPU)."""
    out = w.new_zeros(w.shape[0])
    for j in range(0, w.shape[1], block):
        out += (w[:, j : j + block] * v[j : j + block]).sum(1)
    return out


def gather_codes(
    x, w_enc, b_enc, values, p: Pattern, backend: str = "torch", shift=None
) -> torch.Tensor:
    """``((x - shift) @ w_enc + b_enc)[p.rows, p.cols]``, given as ``values`` (taken from the
    dense product), differentiable in ``w_enc``, ``b_enc`` and ``shift`` through the entries
    alone (``x``: ``[p.n_rows, d_in]`` data)."""
    if x.requires_grad:
        raise ValueError("gather_codes takes no gradient for x: pass the data detached")
    return _GatherCodes.apply(x, shift, w_enc, b_enc, values, p, backend)


def decode_codes(values, w_dec, p: Pattern, backend: str = "torch") -> torch.Tensor:
    """``dense(values) @ w_dec`` ``[n_rows, d]``, differentiable in both through the entries."""
    return _DecodeCodes.apply(values, w_dec, p, backend)


def default_backend(device: torch.device | str) -> str:
    """Triton's kernels on CUDA when Triton is installed; torch's sparse kernels otherwise."""
    return "triton" if torch.device(device).type == "cuda" and triton is not None else "torch"


# --- selections ------------------------------------------------------------------------------


Entries = tuple[torch.Tensor, torch.Tensor]  # (rows, cols), int64, in row-major order


def _row_entries(idx: torch.Tensor) -> Entries:
    """The entries of ``idx`` ``[n_rows, k]`` (row r keeps latents ``idx[r]``), each row's
    latents sorted, so the CSR is canonical."""
    idx = idx.sort(dim=1).values
    n_rows, k = idx.shape
    return torch.arange(n_rows, device=idx.device).repeat_interleave(k), idx.flatten()


def topk_entries(h: torch.Tensor, k: int) -> Entries:
    """Each row's ``k`` largest entries of ``h`` (sae-lens's ``TopK``)."""
    return _row_entries(h.topk(k, dim=-1, sorted=False).indices)


def batch_topk_entries(h: torch.Tensor, n_keep: int) -> Entries:
    """The ``n_keep`` largest entries of ``relu(h)`` over the whole matrix (sae-lens's
    ``BatchTopK``), found without sorting the whole matrix.

    A flat top-k over ``[batch, width]`` cost 4x the encoder's matrix product on a 2-core CPU
    (0.98 s against 0.26 s at batch 4096, width 16,384). Each row's top-m candidates (m = 4
    times the mean per row to start) cost a tenth of that, and the ``n_keep`` largest candidates
    are the ``n_keep`` largest entries when no row's m-th candidate lies above the cut, since
    every entry left out of a row lies below that row's m-th. When some row's does, m doubles
    and the search repeats. The entries kept are those a flat top-k keeps; only ties at the cut
    may be broken differently."""
    n_rows, width = h.shape
    n_keep = min(n_keep, h.numel())
    if n_keep <= 0:  # k * batch < 1: nothing kept (sae-lens's flat top-k keeps zeros)
        empty = torch.zeros(0, dtype=torch.long, device=h.device)
        return empty, empty
    per_row = min(width, max(1, 4 * -(-n_keep // n_rows)))
    while True:
        cand = h.topk(per_row, dim=1, sorted=False)
        best = cand.values.relu().flatten().topk(n_keep, sorted=False)
        cut = best.values.min().clamp_min(0.0)
        if per_row == width or not bool((cand.values.min(dim=1).values > cut).any()):
            latents = cand.indices.flatten()[best.indices]
            rows = torch.div(best.indices, per_row, rounding_mode="floor")
            flat = (rows * width + latents).sort().values
            return torch.div(flat, width, rounding_mode="floor"), flat % width
        per_row = min(width, 2 * per_row)


def dead_topk_entries(h: torch.Tensor, dead: torch.Tensor, k: int) -> Entries:
    """Each row's ``k`` largest entries of ``h`` among the ``dead`` latents (the auxiliary loss's
    selection), ranked within the dead columns alone. (sae-lens's way, masking the live latents
    to -inf and ranking whole rows, measured slower inside the step: 1.21 against 1.06-1.10 s a
    step with 65% of 16,384 latents dead at batch 4096 on a 2-core CPU.)"""
    dead_idx = dead.nonzero().flatten()
    local = h.index_select(1, dead_idx).topk(k, dim=-1, sorted=False).indices
    return _row_entries(dead_idx[local])


# --- Triton kernels --------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _csr_rows_kernel(
        ptr_ptr,
        idx_ptr,
        val_ptr,
        w_ptr,
        out_ptr,
        d,
        stride_w,
        stride_out,
        BLOCK_NNZ: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """out[row, cols] = sum over the row's entries of val * w[idx, cols]."""
        row = tl.program_id(0)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = offs_d < d
        start = tl.load(ptr_ptr + row)
        end = tl.load(ptr_ptr + row + 1)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for j in range(start, end, BLOCK_NNZ):
            offs = j + tl.arange(0, BLOCK_NNZ)
            m = offs < end
            idx = tl.load(idx_ptr + offs, mask=m, other=0)
            v = tl.load(val_ptr + offs, mask=m, other=0.0).to(tl.float32)
            w = tl.load(
                w_ptr + idx[:, None] * stride_w + offs_d[None, :],
                mask=m[:, None] & dmask[None, :],
                other=0.0,
            ).to(tl.float32)
            acc += tl.sum(v[:, None] * w, axis=0)
        tl.store(out_ptr + row.to(tl.int64) * stride_out + offs_d, acc, mask=dmask)

    @triton.jit
    def _sddmm_kernel(
        row_ptr,
        col_ptr,
        a_ptr,
        w_ptr,
        out_ptr,
        nnz,
        d,
        stride_a,
        stride_w,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """out[i] = a[rows[i]] . w[cols[i]]."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = offs < nnz
        r = tl.load(row_ptr + offs, mask=m, other=0)
        c = tl.load(col_ptr + offs, mask=m, other=0)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mm = m[:, None] & (offs_d < d)[None, :]
            a = tl.load(a_ptr + r[:, None] * stride_a + offs_d[None, :], mask=mm, other=0.0)
            w = tl.load(w_ptr + c[:, None] * stride_w + offs_d[None, :], mask=mm, other=0.0)
            acc += tl.sum(a.to(tl.float32) * w.to(tl.float32), axis=1)
        tl.store(out_ptr + offs, acc, mask=m)


def _csr_rows_triton(pointers, indices, values, w, n_out: int) -> torch.Tensor:
    """The CSR-times-dense kernel: ``out[i] = sum_j values[j] * w[indices[j]]`` over row i's
    entries (``pointers[i]:pointers[i + 1]``). No atomics: each output row is one program's."""
    if triton is None:
        raise RuntimeError("Triton is not installed: pip install triton (or backend='torch')")
    w = w.contiguous()
    d = w.shape[1]
    out = torch.empty(n_out, d, dtype=torch.float32, device=w.device)
    if n_out and d:
        block_d = min(128, triton.next_power_of_2(d))
        grid = (n_out, triton.cdiv(d, block_d))
        with _on_device(w):
            _csr_rows_kernel[grid](
                pointers,
                indices,
                values.contiguous(),
                w,
                out,
                d,
                w.stride(0),
                out.stride(0),
                BLOCK_NNZ=16,
                BLOCK_D=block_d,
            )
    return out.to(w.dtype)


def _sddmm_triton(rows, cols, a, w) -> torch.Tensor:
    """The sampled-product kernel: one dot product of ``a[rows[i]]`` and ``w[cols[i]]`` per entry."""
    if triton is None:
        raise RuntimeError("Triton is not installed: pip install triton (or backend='torch')")
    a, w = a.contiguous(), w.contiguous()
    nnz, d = rows.numel(), a.shape[1]
    out = torch.empty(nnz, dtype=torch.float32, device=a.device)
    if nnz:
        block_n = 64
        with _on_device(a):
            _sddmm_kernel[(triton.cdiv(nnz, block_n),)](
                rows,
                cols,
                a,
                w,
                out,
                nnz,
                d,
                a.stride(0),
                w.stride(0),
                BLOCK_N=block_n,
                BLOCK_D=min(64, triton.next_power_of_2(max(d, 1))),
            )
    return out.to(a.dtype)


def _on_device(t: torch.Tensor):
    """Triton launches on the *current* CUDA device: make it the tensors' one (cuda:1 ...). On a
    CPU (Triton's interpreter) nothing to do."""
    import contextlib

    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# --- sae-lens's TopK and BatchTopK training SAEs ---------------------------------------------


def supports(sae) -> bool:
    """Whether ``sae`` is a sae-lens TopK or BatchTopK training SAE whose training forward pass
    ``sparse_training_forward_pass`` reproduces."""
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE
    from sae_lens.saes.topk_sae import TopKTrainingSAE

    return (
        type(sae) in (TopKTrainingSAE, BatchTopKTrainingSAE)
        and {n for n, _ in sae.named_parameters()} == {"W_enc", "b_enc", "W_dec", "b_dec"}
        # the trainer scales or whitens the batch before the step; the SAE itself sees it as is
        and sae.cfg.normalize_activations
        in ("none", "expected_average_only_in", "covariance_whitening")
        and sae.cfg.reshape_activations == "none"
    )


def sparse_training_forward_pass(
    sae,
    sae_in: torch.Tensor,
    dead_neuron_mask: torch.Tensor | None,
    backend: str = "torch",
    matmul_dtype: torch.dtype | None = None,
    workspace: dict | None = None,
):
    """sae-lens's ``training_forward_pass`` of a TopK or BatchTopK training SAE, with the decoder
    and every backward product restricted to the kept entries (module docstring).

    It follows ``TopKTrainingSAE`` operation for operation: ``hidden_pre = (x - b_dec) @ W_enc
    + b_enc``, times ``||W_dec||`` when ``rescale_acts_by_decoder_norm``; TopK (per token) or
    BatchTopK (over the batch) of it, ReLU; decode ``f / ||W_dec|| @ W_dec + b_dec``; loss
    ``mean_b sum_d (x_hat - x)^2`` plus the auxiliary loss of the top ``d_in // 2`` dead latents
    reconstructing the detached residual, scaled by ``min(n_dead / (d_in // 2), 1)``. BatchTopK's
    threshold is updated as sae-lens does. ``feature_acts`` is returned as a sparse COO tensor,
    with the pattern of kept entries. ``matmul_dtype`` (bf16: what autocast gives sae-lens's step)
    is the input type of the encoder product the selection is made on; everything else stays
    float32 (the sparse products: torch's CSR kernels take no bf16, and sae-lens disables autocast
    around its own sparse products for that reason; the dead columns' product: it is small).
    ``workspace``: a dict kept across steps, where the ``[batch, width]`` pre-activations are
    written in place (a fresh 268 MB tensor each step cost ~150 ms of page faults on a CPU).
    """
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE
    from sae_lens.saes.sae import TrainStepOutput

    W_enc, b_enc, W_dec, b_dec = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec
    rescale = bool(sae.cfg.rescale_acts_by_decoder_norm)
    batch_topk = isinstance(sae, BatchTopKTrainingSAE)
    shift = b_dec if sae.cfg.apply_b_dec_to_input else None
    sae_in = sae_in.to(sae.dtype)
    batch, width = sae_in.shape[0], sae.cfg.d_sae
    n_dead = 0 if dead_neuron_mask is None else int(dead_neuron_mask.sum())
    k_aux = min(sae_in.shape[-1] // 2, n_dead)
    # the auxiliary codes are k_aux of the n_dead dead latents per token: past 1 in
    # DENSE_AUX_DENSITY they run faster as dense products over the dead columns
    sparse_aux = n_dead > 0 and k_aux * DENSE_AUX_DENSITY < n_dead
    with torch.no_grad():
        x_in = sae_in if shift is None else sae_in - shift
        if matmul_dtype is None:
            h = _buffer(workspace, "h", (batch, width), W_enc)
            torch.matmul(x_in, W_enc, out=h)
        else:
            h = (x_in.to(matmul_dtype) @ W_enc.to(matmul_dtype)).to(W_enc.dtype)
        h += b_enc
        if rescale:
            h *= W_dec.norm(dim=-1)
        if batch_topk:
            kept = batch_topk_entries(h, int(sae.cfg.k * batch))
        else:
            kept = topk_entries(h, int(sae.cfg.k))
        (rows, cols), x_rows = kept, sae_in
        if sparse_aux:
            # the auxiliary loss's entries as rows batch..2*batch-1 of one pattern with the main
            # ones: one sparse product per step for both terms, instead of two and a sum
            dead_rows, dead_cols = dead_topk_entries(h, dead_neuron_mask, k_aux)
            rows, cols = torch.cat([rows, dead_rows + batch]), torch.cat([cols, dead_cols])
            x_rows = torch.cat([sae_in, sae_in])
        both = Pattern.from_entries(rows, cols, len(x_rows), width)
        h_kept = h.view(-1).index_select(0, (rows % batch) * width + cols)
    n_main = kept[0].numel()
    norms = W_dec.norm(dim=-1)[cols] if rescale else None
    # the encoder at the entries, then sae-lens's own operations on them: the decoder-norm
    # rescaling, ReLU (main entries; the auxiliary loss takes the raw pre-activations), and
    # act_times_W_dec's division by the norm
    pre = h_kept / norms.detach() if rescale else h_kept
    values = gather_codes(x_rows, W_enc, b_enc, pre, both, backend, shift)
    if rescale:
        values = values * norms
    acts = values[:n_main].relu()
    to_decode = torch.cat([acts, values[n_main:]])
    if rescale:
        to_decode = to_decode * (1 / norms)
    decoded = decode_codes(to_decode, W_dec, both, backend)
    sae_out = decoded[:batch] + b_dec
    mse_loss = sae.mse_loss_fn(sae_out, sae_in).sum(dim=-1).mean()
    aux = sae_out.new_tensor(0.0)
    if n_dead:
        residual = (sae_in - sae_out).detach()
        if sparse_aux:
            recons = decoded[batch:]
        else:
            recons = _dense_dead_reconstruction(sae, sae_in, h, dead_neuron_mask, k_aux)
        scale = min(n_dead / (sae_in.shape[-1] // 2), 1.0)
        aux = sae.cfg.aux_loss_coefficient * scale * (recons - residual).pow(2).sum(-1).mean()
    feature_acts = acts.detach()
    if batch_topk:
        _update_topk_threshold(sae, feature_acts)
    return TrainStepOutput(
        sae_in=sae_in,
        sae_out=sae_out,
        feature_acts=torch.sparse_coo_tensor(
            torch.stack(kept),
            feature_acts,
            (batch, width),
            is_coalesced=True,
            check_invariants=False,
        ),
        hidden_pre=h,
        loss=mse_loss + aux,
        losses={"mse_loss": mse_loss, "auxiliary_reconstruction_loss": aux},
        metrics={"topk_threshold": sae.topk_threshold} if batch_topk else {},
    )


def _buffer(workspace: dict | None, name: str, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """``workspace[name]`` if it has this shape, dtype and device, else a new empty tensor (kept
    there when ``workspace`` is a dict)."""
    buf = None if workspace is None else workspace.get(name)
    if buf is None or buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
        buf = like.new_empty(shape)
        if workspace is not None:
            workspace[name] = buf
    return buf


def _dense_dead_reconstruction(sae, sae_in, h, dead_mask, k_aux: int) -> torch.Tensor:
    """sae-lens's ``calculate_topk_aux_loss`` reconstruction, computed densely over the dead
    latents' columns alone: their pre-activations (again, with autograd: a product of
    ``n_dead`` columns), the top ``k_aux`` of each token (chosen on ``h``, the dense product the
    main selection used), and the decode through their decoder rows."""
    dead = dead_mask.nonzero().flatten()
    rescale = bool(sae.cfg.rescale_acts_by_decoder_norm)
    x_in = sae.process_sae_in(sae_in)
    pre = x_in @ sae.W_enc[:, dead] + sae.b_enc[dead]
    w_dec = sae.W_dec[dead]
    norms = w_dec.norm(dim=-1) if rescale else None
    if rescale:
        pre = pre * norms
    with torch.no_grad():
        chosen = h.index_select(1, dead).topk(k_aux, dim=-1, sorted=False).indices
    acts = torch.zeros_like(pre).scatter(-1, chosen, pre.gather(-1, chosen))
    if rescale:
        acts = acts * (1 / norms)
    return acts @ w_dec


@torch.no_grad()
def _update_topk_threshold(sae, feature_acts: torch.Tensor) -> None:
    """``BatchTopKTrainingSAE.update_topk_threshold`` on the kept values alone."""
    positive = feature_acts[feature_acts > 0]
    if positive.numel():
        lr = sae.cfg.topk_threshold_lr
        low = positive.min().to(sae.topk_threshold.dtype)
        sae.topk_threshold = (1 - lr) * sae.topk_threshold + lr * low


@functools.cache
def sparse_trainer_class():
    """``SparseTopKTrainer``, built once on first use so importing this module stays cheap."""
    from sae_lens.training.sae_trainer import SAETrainer

    from sae_training.fused import record_firing, step_optimizer, use_fused_adam

    class SparseTopKTrainer(SAETrainer):
        """sae-lens's ``SAETrainer`` with ``sparse_training_forward_pass`` as its forward pass.
        The rest is sae-lens's: clipping, Adam (in torch's fused form, the same algorithm),
        schedules, firing statistics, checkpoints. Under autocast only the encoder's dense product
        runs in bf16 (``sparse_training_forward_pass``). Under DDP the firing counts are summed
        over the processes, so every process marks the same latents dead (and so builds the
        same graph); the top-k selections are each process's own, as in sae-lens's step."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            if not supports(self.sae):
                raise ValueError(
                    "the sparse step implements sae-lens's TopK and BatchTopK SAEs only; use "
                    "trainer='sae-lens' for this SAE"
                )
            self.backend = default_backend(self.cfg.device)
            self.workspace: dict = {}
            self.distributed = None  # (torch.distributed, world size) under DDP: train_sae
            use_fused_adam(self)

        def _train_step(self, sae, sae_in: torch.Tensor):
            sae.train()
            dtype = torch.bfloat16 if self.cfg.autocast else None
            output = sparse_training_forward_pass(
                sae, sae_in, self.dead_neurons, self.backend, dtype, self.workspace
            )
            with torch.no_grad():
                codes = output.feature_acts
                fired = codes.values() > 0
                counts = torch.bincount(codes.indices()[1][fired], minlength=sae.cfg.d_sae)
                anywhere = counts.clone()  # fired in any process's slice of the batch
                if self.distributed is not None:
                    self.distributed[0].all_reduce(anywhere)
            record_firing(self, counts, anywhere)  # act_freq_scores: this process's rows
            output.loss.backward()
            torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
            step_optimizer(self)
            return output

    return SparseTopKTrainer

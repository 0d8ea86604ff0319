"""Fused encode + statistics for cache shards: one pass over the activations instead of ~8.

Writing a shard needs, per activation row: the storage encoding (bf16 cast, or int8 with a per-row
absmax scale) and the running statistics (column sums for the mean, the row's L2 norm). In torch
that is a chain of elementwise ops and reductions, each a full read of the tensor; the Triton kernel
below reads each row once and writes the encoded row once. We write our own here because neither
TransformerLens nor SAELens fuses quantisation with statistics (SAELens' activation cache stores
raw tensors and computes normalisation statistics in a separate pass).

``encode_reference`` is the torch definition of the numbers; the kernel must reproduce it (bf16
and int8 bit for bit, sums to float32 rounding). CPU code always uses the reference; CUDA uses the
kernel when Triton is importable. Rounding is half away from zero in both, so ties agree.
"""

from __future__ import annotations

import torch

try:  # Triton is optional: CPU-only installs (and CI without the dev extra) run the reference.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None

MODES = {"float32": 0, "bfloat16": 1, "int8": 2}


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def encode_reference(
    x: torch.Tensor, dtype: str
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """``(tensors, column_sum[d] float32, norm_sum[] float32)``: the definition the kernel matches."""
    if dtype not in MODES:
        raise ValueError(f"cache dtype {dtype!r}; choose one of {sorted(MODES)}")
    xf = x.float()
    col_sum = xf.sum(0)
    norm_sum = xf.norm(dim=1).sum()
    if dtype == "int8":
        scale = xf.abs().amax(dim=1) / 127.0 if len(xf) else xf.new_zeros(0)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = round_half_away(xf / safe[:, None]).clamp_(-127, 127).to(torch.int8)
        return {"q": q, "scale": scale}, col_sum, norm_sum
    return {"activations": xf.to(getattr(torch, dtype))}, col_sum, norm_sum


if triton is not None:

    @triton.jit
    def _encode_rows_kernel(
        x_ptr,
        out_ptr,
        scale_ptr,
        colsum_ptr,
        normsum_ptr,
        n_rows,
        d,
        stride_x,
        stride_out,
        MODE: tl.constexpr,
        BLOCK_D: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < d
        col_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        norm_acc = tl.zeros([1], dtype=tl.float32)
        for r in range(ROWS):
            # 64-bit: row * stride overflows int32 beyond 2^31 elements in one batch
            row = pid.to(tl.int64) * ROWS + r
            m = cmask & ((row + cols * 0) < n_rows)
            x = tl.load(x_ptr + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
            col_acc += x
            norm_acc += tl.sqrt_rn(tl.sum(x * x, axis=0))
            if MODE == 2:
                absmax = tl.max(tl.abs(x), axis=0)
                scale = tl.div_rn(absmax, 127.0)
                safe = tl.where(scale > 0, scale, 1.0)
                v = tl.div_rn(x, safe)
                q = tl.where(v >= 0, tl.floor(v + 0.5), -tl.floor(-v + 0.5))
                q = tl.minimum(tl.maximum(q, -127.0), 127.0)
                tl.store(out_ptr + row * stride_out + cols, q.to(tl.int8), mask=m)
                tl.store(scale_ptr + row, scale, mask=row < n_rows)
            elif MODE == 1:
                # Round to nearest even by hand (the bf16 bits are the top 16 of the float32's):
                # identical on every backend, the interpreter included, and equal to torch's cast.
                bits = x.to(tl.uint32, bitcast=True)
                bits = bits + 0x7FFF + ((bits >> 16) & 1)
                hi = (bits >> 16).to(tl.uint16).to(tl.int16, bitcast=True)
                tl.store(out_ptr + row * stride_out + cols, hi, mask=m)
            else:
                tl.store(out_ptr + row * stride_out + cols, x, mask=m)
        tl.atomic_add(colsum_ptr + cols, col_acc, mask=cmask)
        tl.atomic_add(normsum_ptr + tl.arange(0, 1), norm_acc)


def encode_triton(
    x: torch.Tensor, dtype: str, rows_per_program: int = 16
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The fused kernel (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``)."""
    if triton is None:
        raise RuntimeError("Triton is not installed: pip install triton (or use encode_reference)")
    if dtype not in MODES:
        raise ValueError(f"cache dtype {dtype!r}; choose one of {sorted(MODES)}")
    x = x.contiguous()
    n, d = x.shape
    out_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}[dtype]
    out = torch.empty((n, d), dtype=out_dtype, device=x.device)
    scale = torch.empty(n if dtype == "int8" else 1, dtype=torch.float32, device=x.device)
    col_sum = torch.zeros(d, dtype=torch.float32, device=x.device)
    norm_sum = torch.zeros(1, dtype=torch.float32, device=x.device)
    # bf16 is written as its raw 16-bit pattern through an int16 view (see the kernel).
    out_arg = out.view(torch.int16) if dtype == "bfloat16" else out
    if n:
        grid = (triton.cdiv(n, rows_per_program),)
        _encode_rows_kernel[grid](
            x,
            out_arg,
            scale,
            col_sum,
            norm_sum,
            n,
            d,
            x.stride(0),
            out.stride(0),
            MODE=MODES[dtype],
            BLOCK_D=triton.next_power_of_2(d),
            ROWS=rows_per_program,
        )
    tensors = {"q": out, "scale": scale} if dtype == "int8" else {"activations": out}
    return tensors, col_sum, norm_sum[0]


def encode_with_statistics(
    x: torch.Tensor, dtype: str
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Encode a shard's rows and their statistics on x's device: the kernel on CUDA, else torch."""
    if x.is_cuda and triton is not None:
        return encode_triton(x, dtype)
    return encode_reference(x, dtype)

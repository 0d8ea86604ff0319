"""GPU check for the cache and SAE training (one H100/H200, under 5 minutes).

    python experiments/benchmarks/gpu_cache_sae.py

0. Kernel: the fused Triton encode+statistics kernel equals its torch reference (bf16 and int8 bit
   for bit, sums to float32 rounding) on awkward and large inputs; its time vs the torch reference.
1. Cache: SmolLM2-135M-shaped model (random weights; 30 layers, d_model 576), batch 64 x 256
   tokens, hook blocks.15.hook_resid_post. Prints irmlens capture tokens/s (bf16 autocast, forward
   stopped after layer 15, device-to-pinned-host copies) as a fraction of the bare truncated forward
   pass on the same tokens (target >= 0.9). ``capture_encoded`` is the path ``build_paired_cache``
   writes shards from: forward, fused encode (bf16) + statistics on the GPU, side-stream copy.
2. SAE training: standard L1, d_in 576, width 16384, batch 4096, bf16 autocast. Checks the
   hand-derived step (``sae_training/fused.py``) against autograd on CUDA, then prints tokens/s of
   ``train_sae`` with that step and with sae-lens's own step as a fraction of the bf16 matmul
   limit, measured here (peak TFLOP/s of a large bf16 matmul) divided by the step's
   ~12 * d_in * d_sae FLOPs per token (target >= 0.35), and a CUDA kernel profile of the step.
"""

from __future__ import annotations

import time

import torch


def _time(fn, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def cache_check() -> None:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from irmlens.cache.capture import capture_encoded

    cfg = HookedTransformerConfig(
        n_layers=30,
        d_model=576,
        n_ctx=256,
        d_head=64,
        n_heads=9,
        n_key_value_heads=3,
        d_mlp=1536,
        d_vocab=49152,
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        gated_mlp=True,
        device="cuda",
    )
    model = HookedTransformer(cfg).eval()
    tokens = torch.randint(0, 49152, (64 * 8, 256))
    valid = torch.ones_like(tokens, dtype=torch.bool)
    hook, layer = "blocks.15.hook_resid_post", 15

    @torch.no_grad()
    def bare():
        for i in range(0, len(tokens), 64):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                model(tokens[i : i + 64].cuda(non_blocking=True), stop_at_layer=layer + 1)

    def ours():
        capture_encoded(model, tokens, valid, [hook], 64, "bfloat16")

    t_bare, t_ours = _time(bare, 3), _time(ours, 3)
    n = tokens.numel()
    print(
        f"cache: bare truncated forward {n / t_bare / 1e6:.3f} M tok/s; irmlens capture "
        f"{n / t_ours / 1e6:.3f} M tok/s -> fraction {t_bare / t_ours:.2f} (target >= 0.9)"
    )


def kernel_check() -> None:
    from irmlens.cache.kernels import encode_reference, encode_triton

    g = torch.Generator().manual_seed(0)
    cases = {"awkward": torch.randn(53, 70, generator=g) * 3, "large": torch.randn(65536, 576)}
    x = cases["awkward"]
    x[5] = 0.0
    x[6, :10] = 0.5 / 127 * torch.arange(1, 11)
    x[6, 10:] = 1.0
    x[7, 3] = 1e4
    for name, x in cases.items():
        for dtype in ("float32", "bfloat16", "int8"):
            ref, cs, ns = encode_reference(x, dtype)
            got, cs2, ns2 = encode_triton(x.cuda(), dtype)
            exact = all(torch.equal(ref[k], got[k].cpu()) for k in ref)
            col_err = ((cs - cs2.cpu()).abs() / (cs.abs() + 1)).max().item()
            norm_err = abs(ns.item() - ns2.item()) / ns.item()
            print(
                f"kernel {name} {dtype}: encoded bit-exact {exact}; column-sum rel err "
                f"{col_err:.1e}; norm-sum rel err {norm_err:.1e}"
            )
    x = cases["large"].cuda()
    for dtype in ("bfloat16", "int8"):
        t_ref = _time(lambda dtype=dtype: encode_reference(x, dtype), 20)
        t_k = _time(lambda dtype=dtype: encode_triton(x, dtype), 20)
        gbs = x.numel() * (4 + (2 if dtype == "bfloat16" else 1)) / t_k / 1e9
        print(
            f"kernel 65536x576 {dtype}: torch reference {t_ref * 1e6:.0f} us, fused "
            f"{t_k * 1e6:.0f} us ({t_ref / t_k:.1f}x, {gbs:.0f} GB/s)"
        )


def sae_check() -> None:
    from sae_training.fused import standard_sae_step
    from sae_training.train import SAETrainingConfig, make_training_sae, train_sae

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = _time(lambda: a @ a, 10)
    peak = 2 * 8192**3 / t
    d_in, d_sae, batch = 576, 16384, 4096
    limit = peak / (12 * d_in * d_sae)

    # the hand-derived step on CUDA: float32 gradients vs autograd through sae-lens's SAE
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    sae = make_training_sae(SAETrainingConfig(width=d_sae, device="cuda"), d_in, 10, "h", "m")
    x = torch.randn(batch, d_in, device="cuda")
    with torch.no_grad():
        sae.b_enc.fill_(-0.1)  # pre-activations ~ N(0, 0.1^2) at init: about 16% fire
    from sae_lens.saes.sae import TrainStepInput

    out = sae.training_forward_pass(TrainStepInput(x, {"l1": 1.0}, None, 0, False))
    out.loss.backward()
    params = dict(sae.named_parameters())
    print(f"fused step check: {float((out.feature_acts > 0).float().mean()):.2f} of features fire")
    exact = standard_sae_step(sae, x, 1.0)
    low = standard_sae_step(sae, x, 1.0, torch.bfloat16)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        ref = params[name].grad
        err = ((exact.grads[name] - ref).norm() / ref.norm()).item()
        cos = torch.nn.functional.cosine_similarity(
            low.grads[name].flatten(), ref.flatten(), 0
        ).item()
        print(f"fused step {name}: float32 rel. error vs autograd {err:.1e}; bf16 cosine {cos:.4f}")
    del sae, out, exact, low, params

    acts = torch.randn(batch * 1300, d_in, device="cuda")  # on the GPU: no host-side gather
    heldout = torch.randn(batch, d_in, device="cuda")
    rates = {}
    for trainer in ("fused", "sae-lens"):
        cfg = SAETrainingConfig(
            width=d_sae,
            l1_coefficient=1.0,
            lr=3e-4,
            batch_size=batch,
            epochs=1.0,
            device="cuda",
            autocast=True,
            trainer=trainer,
        )
        train_sae(acts[: batch * 20], cfg, "h", "m")  # warm-up

        def run(n_steps: int, cfg=cfg) -> tuple[float, object]:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            sae = train_sae(acts[: batch * n_steps], cfg, "h", "m")
            torch.cuda.synchronize()
            return time.perf_counter() - t0, sae

        # Steady-state rate: the marginal cost of 1000 more steps (set-up and the norm estimate
        # cancel).
        (t_short, _), (t_long, sae) = run(300), run(1300)
        tps = batch * 1000 / (t_long - t_short)
        rates[trainer] = tps
        with torch.no_grad():
            f = sae.encode(heldout)
            mse = ((sae.decode(f) - heldout) ** 2).sum(-1).mean().item()
            loss = mse + (f * sae.W_dec.norm(dim=1)).sum(-1).mean().item()
        print(
            f"sae (trainer={trainer}): bf16 matmul peak {peak / 1e12:.0f} TFLOP/s -> limit "
            f"{limit / 1e6:.2f} M tok/s; train_sae {tps / 1e6:.2f} M tok/s steady state -> "
            f"fraction {tps / limit:.2f} (target >= 0.35); held-out MSE {mse:.3f}, loss {loss:.3f}"
        )
    print(f"sae: fused / sae-lens step {rates['fused'] / rates['sae-lens']:.2f}x")
    cfg = SAETrainingConfig(width=d_sae, batch_size=batch, epochs=1.0, device="cuda", autocast=True)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        train_sae(acts[: batch * 120], cfg, "h", "m")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=12))


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check is for a GPU machine")
    print(torch.cuda.get_device_name(0), "torch", torch.__version__)
    kernel_check()
    cache_check()
    sae_check()

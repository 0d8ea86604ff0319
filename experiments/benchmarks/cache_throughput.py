"""Cache throughput, as ratios measured in the same run on this machine (CPU or GPU).

    python experiments/benchmarks/cache_throughput.py [--layers 12] [--d-model 256] [--rows 256]

Same model (random GPT-2-shaped HookedTransformer), same hook (blocks.3.hook_resid_post), same
tokens, for:
  * irmlens   -- ``build_paired_cache`` for one model: stops after the hook's layer, writes bf16
                 shards with sha256 and running statistics to disk;
  * TL full   -- TransformerLens ``run_with_cache`` of the whole model (every hook, in memory);
  * SAELens   -- sae-lens's own activation pipeline, ``CacheActivationsRunner`` (writes an HF
                 dataset to disk), with its model loader patched to return the same in-memory model
                 (it can only load models by hub name).
Prints tokens/s for each and irmlens's ratio to each (target in the issue: >= 3x both).

Two bounds, same tokens, nothing stored (they say how far any caching pipeline could go):
  * bare TL forward  -- TransformerLens's forward stopped after the hook's layer, the hook's
                        output kept in memory: the ceiling of any pipeline built on TL's forward;
  * hand-written     -- the same layers written directly (one fused QKV matmul, torch's SDPA,
                        F.linear), checked against TL to 1e-4: the ceiling of replacing TL's forward
                        at this precision. Its ratio to SAELens is the most a 3x target could get.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def _synchronize(model) -> None:
    """Wait for the GPU, so a timing covers the work and not just its launch."""
    if str(model.cfg.device).startswith("cuda"):
        torch.cuda.synchronize()


def make_model(layers: int, d_model: int, vocab: int, n_ctx: int, device: str):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=layers,
        d_model=d_model,
        n_ctx=n_ctx,
        d_head=64,
        n_heads=d_model // 64,
        d_mlp=4 * d_model,
        d_vocab=vocab,
        act_fn="gelu",
        normalization_type="LN",
        device=device,
    )
    return HookedTransformer(cfg).eval()


def bench_irmlens(model, tokens, layer, tmp) -> float:
    from irmlens.cache.capture import build_paired_cache
    from irmlens.cache.tokens import TokenRows

    valid = torch.ones_like(tokens, dtype=torch.bool)
    rows = TokenRows(tokens, valid, torch.full_like(tokens, -1), [])
    t = time.perf_counter()
    build_paired_cache(
        {"base": model}, rows, [layer], Path(tmp) / "irmlens", {}, batch_size=32, shard_rows=64
    )
    return tokens.numel() / (time.perf_counter() - t)


@torch.no_grad()
def bench_tl_full(model, tokens) -> float:
    t = time.perf_counter()
    for i in range(0, len(tokens), 32):
        _, cache = model.run_with_cache(tokens[i : i + 32].to(model.cfg.device))
        del cache
    _synchronize(model)
    return tokens.numel() / (time.perf_counter() - t)


@torch.no_grad()
def bench_bare_forward(model, tokens, layer) -> float:
    hook = f"blocks.{layer}.hook_resid_post"
    t = time.perf_counter()
    for i in range(0, len(tokens), 32):
        _, cache = model.run_with_cache(
            tokens[i : i + 32].to(model.cfg.device), names_filter=hook, stop_at_layer=layer + 1
        )
        del cache
    _synchronize(model)
    return tokens.numel() / (time.perf_counter() - t)


def hand_written_forward(model, layer: int):
    """``tokens -> blocks.{layer}.hook_resid_post`` for ``make_model``'s GPT-2 shape (LayerNorm,
    GELU, learned positions) without TransformerLens: QKV as one matmul, torch's SDPA."""
    import torch.nn.functional as F

    cfg = model.cfg
    n_heads, d_head, d = cfg.n_heads, cfg.d_head, cfg.d_model
    blocks = []
    for block in model.blocks[: layer + 1]:
        a = block.attn
        w_qkv = torch.cat([w.permute(0, 2, 1).reshape(-1, d) for w in (a.W_Q, a.W_K, a.W_V)])
        b_qkv = torch.cat([a.b_Q.reshape(-1), a.b_K.reshape(-1), a.b_V.reshape(-1)])
        blocks.append(
            (
                block.ln1,
                w_qkv.contiguous(),
                b_qkv,
                a.W_O.reshape(-1, d).T.contiguous(),
                a.b_O,
                block.ln2,
                block.mlp.W_in.T.contiguous(),
                block.mlp.b_in,
                block.mlp.W_out.T.contiguous(),
                block.mlp.b_out,
            )
        )

    def layer_norm(x, ln):
        return F.layer_norm(x, (d,), ln.w, ln.b, cfg.eps)

    @torch.no_grad()
    def forward(tokens: torch.Tensor) -> torch.Tensor:
        b, t = tokens.shape
        x = model.embed.W_E[tokens] + model.pos_embed.W_pos[:t]
        for ln1, w_qkv, b_qkv, w_o, b_o, ln2, w_in, b_in, w_out, b_out in blocks:
            qkv = F.linear(layer_norm(x, ln1), w_qkv, b_qkv).view(b, t, 3, n_heads, d_head)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + F.linear(z.transpose(1, 2).reshape(b, t, n_heads * d_head), w_o, b_o)
            x = x + F.linear(F.gelu(F.linear(layer_norm(x, ln2), w_in, b_in)), w_out, b_out)
        return x

    return forward


def bench_hand_written(model, tokens, layer) -> float:
    forward = hand_written_forward(model, layer)
    hook = f"blocks.{layer}.hook_resid_post"
    _, cache = model.run_with_cache(tokens[:4], names_filter=hook, stop_at_layer=layer + 1)
    err = float((forward(tokens[:4]) - cache[hook]).abs().max())
    assert err < 1e-4, f"hand-written forward differs from TransformerLens by {err}"
    t = time.perf_counter()
    for i in range(0, len(tokens), 32):
        forward(tokens[i : i + 32].to(model.cfg.device))
    _synchronize(model)
    return tokens.numel() / (time.perf_counter() - t)


def bench_saelens(model, tokens, layer, tmp) -> float:
    import datasets
    import sae_lens.cache_activations_runner as car
    from sae_lens.config import CacheActivationsRunnerConfig

    car.load_model = lambda *a, **k: model  # the runner can only load hub models by name
    ds = datasets.Dataset.from_dict({"input_ids": tokens.tolist()})
    cfg = CacheActivationsRunnerConfig(
        dataset_path="local",
        model_name="bench",
        model_batch_size=32,
        hook_name=f"blocks.{layer}.hook_resid_post",
        d_in=model.cfg.d_model,
        training_tokens=tokens.numel(),
        context_size=tokens.shape[1],
        prepend_bos=False,
        new_cached_activations_path=str(Path(tmp) / "saelens"),
        shuffle=False,
        device=str(model.cfg.device),
        dtype="float32",
        # one buffer of exactly these tokens: the default (2 GB) would cache far more than asked
        buffer_size_gb=(tokens.numel() * model.cfg.d_model * 4 + 1) / 1e9,
    )
    t = time.perf_counter()
    car.CacheActivationsRunner(cfg, override_dataset=ds).run()
    elapsed = time.perf_counter() - t
    written = len(datasets.load_from_disk(str(Path(tmp) / "saelens"))) * tokens.shape[1]
    assert written == tokens.numel(), f"sae-lens cached {written} tokens, not {tokens.numel()}"
    return tokens.numel() / elapsed


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--rows", type=int, default=None, help="token rows (256 on CPU, 4096 on GPU)")
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--layer", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="best of this many timings each")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.rows = args.rows or (4096 if device == "cuda" else 256)
    model = make_model(args.layers, args.d_model, 4096, args.ctx, device)
    tokens = torch.randint(
        1, 4096, (args.rows, args.ctx), generator=torch.Generator().manual_seed(0)
    )
    runs = {
        "irmlens": lambda d: bench_irmlens(model, tokens, args.layer, d),
        "TL full run_with_cache": lambda d: bench_tl_full(model, tokens),
        "SAELens CacheActivationsRunner": lambda d: bench_saelens(model, tokens, args.layer, d),
        "bare TL forward (bound)": lambda d: bench_bare_forward(model, tokens, args.layer),
        "hand-written forward (bound)": lambda d: bench_hand_written(model, tokens, args.layer),
    }
    best: dict[str, float | None] = {}
    with tempfile.TemporaryDirectory() as tmp:
        bench_tl_full(model, tokens[:32])  # warm-ups (and the Triton kernel's compilation)
        bench_irmlens(model, tokens[:64], args.layer, Path(tmp) / "warm")
        bench_hand_written(model, tokens[:64], args.layer)
        # best of --repeats, the candidates interleaved so a slow spell of the machine hits all
        for r in range(args.repeats):
            for i, (name, run) in enumerate(runs.items()):
                if name in best and best[name] is None:
                    continue
                try:
                    tps = run(Path(tmp) / f"round{r}-{i}")
                except Exception as e:  # report, do not hide: the comparison is then missing
                    print(f"{name} failed: {type(e).__name__}: {e}")
                    best[name] = None
                    continue
                best[name] = max(tps, best.get(name) or 0.0)
    results = {k: v for k, v in best.items() if "bound" not in k and v is not None}
    bounds = {k: v for k, v in best.items() if "bound" in k and v is not None}
    print(
        f"device {device}; model {args.layers} layers, d_model {args.d_model}; hook layer {args.layer}; "
        f"{tokens.numel()} tokens; best of {args.repeats}"
    )
    for name, tps in {**results, **bounds}.items():
        print(f"  {name:32s} {tps:12.0f} tokens/s")
    base = results["irmlens"]
    for name, tps in results.items():
        if name != "irmlens":
            print(f"  irmlens / {name}: {base / tps:.2f}x (target >= 3x)")
    print(f"  irmlens / bare TL forward: {base / bounds['bare TL forward (bound)']:.2f}")
    theirs = results.get("SAELens CacheActivationsRunner")
    if theirs:
        for name, tps in bounds.items():
            print(f"  most any pipeline could reach vs SAELens, {name}: {tps / theirs:.2f}x")


if __name__ == "__main__":
    main()

"""SAE training speed and final loss: irmlens's ``train_sae`` vs SAELens's training runner, same
activations and config, measured in the same run.

    python experiments/benchmarks/sae_training_speed.py [--tokens 400000] [--width-mult 4]

Both train a standard (L1) sae-lens SAE with the same d_sae, L1 coefficient, lr schedule, batch
size and number of training tokens, on the *same* activations: sae-lens's
``CacheActivationsRunner`` caches them once (hook blocks.3.hook_resid_post of a random
GPT-2-shaped model); SAELens's ``LanguageModelSAETrainingRunner`` trains from that cache
(``use_cached_activations``), irmlens from the same rows loaded as one tensor. Prints tokens/s,
the ratio (target >= 1.5x) and both SAEs' training loss (MSE + l1 * sum|f| ||W_dec||) on the
same held-out rows (target: within 2%).

Also prints a bound: the time of the five matrix products one standard-SAE step cannot avoid
(encode, decode, and the gradients of W_dec, of the pre-activations and of W_enc), at the
benchmark's shapes and precision, times the number of steps. SAELens's time over that floor is the
most any implementation of this training could gain over SAELens on this machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


@torch.no_grad()
def l1_loss(sae, x: torch.Tensor, l1: float) -> float:
    """The standard SAE objective (sae-lens's): MSE summed over d_in + l1 * sum_i f_i ||W_dec,i||."""
    x = x.to(sae.W_enc.device)
    f = sae.encode(x)
    recon = sae.decode(f)
    mse = ((recon - x) ** 2).sum(-1).mean()
    sparsity = (f * sae.W_dec.norm(dim=1)).sum(-1).mean()
    return float(mse + l1 * sparsity)


def matmul_floor(batch: int, d_in: int, d_sae: int, steps: int, device: str, autocast: bool):
    """Seconds for ``steps`` x the five matmuls of a standard-SAE step (best of 3 timings)."""
    dtype = torch.bfloat16 if autocast else torch.float32
    x = torch.randn(batch, d_in, device=device, dtype=dtype)
    f = torch.randn(batch, d_sae, device=device, dtype=dtype)
    w_enc = torch.randn(d_in, d_sae, device=device, dtype=dtype)
    w_dec = torch.randn(d_sae, d_in, device=device, dtype=dtype)

    def step() -> None:
        x @ w_enc, f @ w_dec, f.T @ x, x @ w_dec.T, x.T @ f

    step()
    best = float("inf")
    for _ in range(3):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(5):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t) / 5)
    return best * steps


def main() -> None:
    import sys

    import datasets
    import sae_lens.cache_activations_runner as car
    from sae_lens.config import CacheActivationsRunnerConfig

    sys.path.insert(0, str(Path(__file__).parent))
    from cache_throughput import make_model

    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=400_000)
    p.add_argument("--width-mult", type=int, default=4)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--l1", type=float, default=5.0)
    p.add_argument(
        "--precisions",
        default="float32,bf16",
        help="comma list: float32 (no autocast) and/or bf16 (autocast, both sides)",
    )
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ctx, layer = 128, 3
    model = make_model(6, 256, 4096, ctx, device)
    hook = f"blocks.{layer}.hook_resid_post"
    n_rows = (args.tokens // ctx + 16 + 31) // 32 * 32  # + held-out rows; whole model batches
    tokens = torch.randint(1, 4096, (n_rows, ctx), generator=torch.Generator().manual_seed(0))
    d_in, d_sae = model.cfg.d_model, args.width_mult * model.cfg.d_model
    with tempfile.TemporaryDirectory() as tmp:
        car.load_model = lambda *a, **k: model  # sae-lens loads models by hub name only
        token_ds = datasets.Dataset.from_dict({"input_ids": tokens.tolist()})
        cache_path = str(Path(tmp) / "acts")
        car.CacheActivationsRunner(
            CacheActivationsRunnerConfig(
                dataset_path="local",
                model_name="bench",
                model_batch_size=32,
                hook_name=hook,
                d_in=d_in,
                training_tokens=tokens.numel(),
                context_size=ctx,
                prepend_bos=False,
                new_cached_activations_path=cache_path,
                shuffle=False,
                device=device,
                dtype="float32",
                buffer_size_gb=(tokens.numel() * d_in * 4 + 1) / 1e9,  # exactly these tokens
            ),
            override_dataset=token_ds,
        ).run()
        ds = datasets.load_from_disk(cache_path).with_format("torch")
        acts = ds[:][hook].reshape(-1, d_in).float()
        train_acts, heldout = acts[: args.tokens], acts[args.tokens : args.tokens + 2048]

        results = []
        for precision in args.precisions.split(","):
            autocast = {"float32": False, "bf16": True}[precision]
            results.append(
                (
                    precision,
                    *_compare(
                        args,
                        model,
                        hook,
                        token_ds,
                        cache_path,
                        train_acts,
                        heldout,
                        d_in,
                        d_sae,
                        device,
                        autocast,
                    ),
                )
            )

    print(
        f"device {device}; d_in {d_in}, d_sae {d_sae}, batch {args.batch}, {args.tokens} tokens, l1 {args.l1}"
    )
    steps = args.tokens // args.batch
    for precision, ours_tps, theirs_tps, loss_ours, loss_theirs in results:
        floor = matmul_floor(args.batch, d_in, d_sae, steps, device, precision == "bf16")
        print(
            f"  [{precision}] irmlens train_sae  {ours_tps:10.0f} tokens/s   held-out loss {loss_ours:.4f}"
        )
        print(
            f"  [{precision}] SAELens runner     {theirs_tps:10.0f} tokens/s   held-out loss {loss_theirs:.4f}"
        )
        print(
            f"  [{precision}] speed ratio {ours_tps / theirs_tps:.2f}x (target >= 1.5x); loss "
            f"difference {100 * (loss_ours - loss_theirs) / loss_theirs:+.2f}% (target within 2%)"
        )
        print(
            f"  [{precision}] bound: the step's five matmuls alone {args.tokens / floor:10.0f} "
            f"tokens/s = {args.tokens / floor / theirs_tps:.2f}x SAELens; irmlens reaches "
            f"{floor / (args.tokens / ours_tps):.2f} of that floor"
        )


def _compare(
    args, model, hook, token_ds, cache_path, train_acts, heldout, d_in, d_sae, device, autocast
):
    """(irmlens tokens/s, SAELens tokens/s, irmlens held-out loss, SAELens held-out loss)."""
    import sae_lens.llm_sae_training_runner as ltr
    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig, StandardTrainingSAEConfig

    from sae_training.train import SAETrainingConfig, train_sae

    with tempfile.TemporaryDirectory() as tmp:
        ours_cfg = SAETrainingConfig(
            width=d_sae,
            l1_coefficient=args.l1,
            lr=3e-4,
            batch_size=args.batch,
            epochs=1.0,
            device=device,
            autocast=autocast,
        )
        t = time.perf_counter()
        ours = train_sae(train_acts, ours_cfg, hook, "bench")
        ours_tps = args.tokens / (time.perf_counter() - t)

        steps = args.tokens // args.batch
        ltr.load_model = lambda *a, **k: model
        runner_cfg = LanguageModelSAERunnerConfig(
            sae=StandardTrainingSAEConfig(
                d_in=d_in,
                d_sae=d_sae,
                l1_coefficient=args.l1,
                l1_warm_up_steps=int(0.1 * steps),
                normalize_activations="expected_average_only_in",
            ),
            model_name="bench",
            hook_name=hook,
            dataset_path="",
            use_cached_activations=True,
            cached_activations_path=cache_path,
            context_size=model.cfg.n_ctx,
            training_tokens=steps * args.batch,
            train_batch_size_tokens=args.batch,
            lr=3e-4,
            lr_end=3e-5,
            lr_scheduler_name="cosineannealing",
            lr_warm_up_steps=min(100, steps // 10),
            n_batches_in_buffer=64,
            store_batch_size_prompts=32,
            n_batches_for_norm_estimate=min(100, steps),
            dead_feature_window=max(1, steps // 4),
            feature_sampling_window=max(1, steps // 4),
            device=device,
            autocast=autocast,
            checkpoint_path=None,
            output_path=str(Path(tmp) / "out"),
            logger=LoggingConfig(log_to_wandb=False),
            n_eval_batches=0,
        )
        t = time.perf_counter()
        theirs = ltr.LanguageModelSAETrainingRunner(
            runner_cfg, override_model=model, override_dataset=token_ds
        ).run()
        theirs_tps = args.tokens / (time.perf_counter() - t)

    loss_ours, loss_theirs = l1_loss(ours, heldout, args.l1), l1_loss(theirs, heldout, args.l1)
    return ours_tps, theirs_tps, loss_ours, loss_theirs


if __name__ == "__main__":
    main()

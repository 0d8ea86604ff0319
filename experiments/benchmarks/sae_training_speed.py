"""SAE training speed and final loss: irmlens's ``train_sae`` vs SAELens's training runner, same
activations and config, measured in the same run.

    python experiments/benchmarks/sae_training_speed.py [--tokens 400000] [--width-mult 4]
    python experiments/benchmarks/sae_training_speed.py --arch topk|batchtopk
        (defaults: d_in 576, width 16384, k 64, batch 4096, 200,000 tokens, float32)

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

With ``--arch topk`` or ``batchtopk``, both train that architecture (sae-lens's TopK/BatchTopK
training SAE: decoder-norm rescaling, the dead-latent auxiliary loss), irmlens through its sparse
step (``sae_training/sparse.py``). The loss compared is the held-out MSE (summed over d_in). The
bound is the work no implementation of the step avoids: one dense encoder product, the per-token
top-k of its result, the sparse products over the kept entries (decode, the codes' gradient, the
decoder's and encoder's gradients), and, in each step that has dead latents, the auxiliary loss's
selection and the cheaper of its dense products over their columns or its sparse products (the
run's own counts of dead latents, recorded per step), each timed on this machine at the
benchmark's shapes. A third run, irmlens's loop with sae-lens's step, separates the step's effect
on the loss (same batches) from the two loops' (SAELens's runner shuffles its own batches). Targets: >= 3x SAELens on CPU, loss within
1%, >= 0.8 of the bound.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
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


@torch.no_grad()
def heldout_mse(sae, x: torch.Tensor) -> float:
    """The TopK/BatchTopK objective's reconstruction term: MSE summed over d_in, mean over rows."""
    x = x.to(sae.W_enc.device)
    return float(((sae.decode(sae.encode(x)) - x) ** 2).sum(-1).mean())


def _best_of(fn, device: str, repeats: int = 3) -> float:
    """Best wall time of ``fn()`` over ``repeats`` runs, after one warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def _sparse_products(batch: int, d_in: int, d_sae: int, per_row: int, device: str) -> float:
    """Seconds of the four sparse products of a step (decode, the codes' gradient, the decoder's
    and the encoder's gradients) over ``per_row`` kept entries per token (torch's CSR kernels,
    as irmlens's step uses on a CPU)."""
    from sae_training import sparse

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, d_in, generator=g).to(device)
    w_dec = torch.randn(d_sae, d_in, generator=g).to(device)
    rows, cols = sparse.topk_entries(torch.rand(batch, d_sae, generator=g).to(device), per_row)
    p = sparse.Pattern.from_entries(rows, cols, batch, d_sae)
    values = torch.randn(p.nnz, generator=g).to(device)

    def products() -> None:
        sparse.spmm(p, values, w_dec)
        sparse.sddmm(p, x, w_dec)
        sparse.spmm_t(p, values, x)
        sparse.spmm_t(p, values, x)

    return _best_of(products, device)


def sparse_step_floor(batch: int, d_in: int, d_sae: int, k: int, device: str) -> dict:
    """Seconds per step of the work a TopK step cannot avoid, each part timed alone: the dense
    encoder product (into a reused buffer), the per-token top-k, and the sparse products over
    the ``batch * k`` kept entries."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, d_in, generator=g).to(device)
    w_enc = torch.randn(d_in, d_sae, generator=g).to(device)
    h = torch.empty(batch, d_sae, device=device)
    return {
        "encoder": _best_of(lambda: torch.matmul(x, w_enc, out=h), device),
        "topk": _best_of(lambda: h.topk(k, dim=-1, sorted=False), device),
        "sparse": _sparse_products(batch, d_in, d_sae, k, device),
    }


def aux_floor(batch: int, d_in: int, n_dead: int, device: str) -> float:
    """Seconds of the auxiliary loss's unavoidable work with ``n_dead`` dead latents: the top
    ``d_in // 2`` of each token among them, then the cheaper of its two forms: five dense
    products over their columns (pre-codes, decode, and the gradients of the codes, the decoder
    rows and the encoder columns), or the four sparse products over the kept entries."""
    if n_dead == 0:
        return 0.0
    k_aux = min(d_in // 2, n_dead)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, d_in, generator=g).to(device)
    w = torch.randn(d_in, n_dead, generator=g).to(device)
    codes = torch.randn(batch, n_dead, generator=g).to(device)

    def dense() -> None:
        x @ w, codes @ w.T, codes.T @ x, x @ w, x.T @ codes

    select = _best_of(lambda: codes.topk(k_aux, dim=-1, sorted=False), device)
    return select + min(
        _best_of(dense, device), _sparse_products(batch, d_in, n_dead, k_aux, device)
    )


def _report_sparse(args, results, d_in: int, d_sae: int, device: str) -> None:
    """Print the TopK/BatchTopK comparison and its bound (module docstring)."""
    steps = args.tokens // args.batch
    parts = sparse_step_floor(args.batch, d_in, d_sae, args.k, device)
    dead = _DEAD_COUNTS or [0]
    with_dead = [n for n in dead if n] or [0]
    mean_dead = round(sum(with_dead) / len(with_dead))  # over the steps that have dead latents
    aux_steps = sum(1 for n in dead if n)
    aux = aux_floor(args.batch, d_in, mean_dead, device) * aux_steps / max(1, len(dead))
    floor = steps * (sum(parts.values()) + aux)
    print(
        f"device {device}; {args.arch}: d_in {d_in}, width {d_sae}, k {args.k}, batch "
        f"{args.batch}, {args.tokens} tokens"
    )
    for precision, ours_tps, theirs_tps, loss_ours, loss_theirs in results:
        print(
            f"  [{precision}] irmlens train_sae (sparse step) {ours_tps:9.0f} tokens/s   held-out MSE {loss_ours:.4f}"
        )
        print(
            f"  [{precision}] SAELens runner               {theirs_tps:9.0f} tokens/s   held-out MSE {loss_theirs:.4f}"
        )
        print(
            f"  [{precision}] speed ratio {ours_tps / theirs_tps:.2f}x (target >= 3x); loss "
            f"difference {100 * (loss_ours - loss_theirs) / loss_theirs:+.2f}% (target within 1%)"
        )
        same = _SAME_LOOP
        print(
            f"  [{precision}] irmlens loop, sae-lens's step  {same['tps']:9.0f} tokens/s   "
            f"held-out MSE {same['loss']:.4f}: sparse step {ours_tps / same['tps']:.2f}x, loss "
            f"{100 * (loss_ours - same['loss']) / same['loss']:+.3f}% on the same batches"
        )
        print(
            f"  [{precision}] bound per step: encoder product {parts['encoder'] * 1e3:.0f} ms, "
            f"top-k {parts['topk'] * 1e3:.0f} ms, sparse products {parts['sparse'] * 1e3:.0f} ms, "
            f"dead-latent products {aux * 1e3:.0f} ms (mean {mean_dead} dead latents in "
            f"{aux_steps} of {len(dead)} steps) = {args.tokens / floor:.0f} tokens/s = "
            f"{args.tokens / floor / theirs_tps:.2f}x SAELens; irmlens reaches "
            f"{floor / (args.tokens / ours_tps):.2f} of it (target >= 0.8)"
        )


_SAME_LOOP: dict = {}  # irmlens's loop with sae-lens's step: tokens/s and held-out MSE
_DEAD_COUNTS: list[int] = []  # dead latents at each of irmlens's sparse steps (this run's)


def _record_dead_counts() -> None:
    """Wrap the sparse forward pass to note each step's dead-latent count for the bound."""
    from sae_training import sparse

    forward = sparse.sparse_training_forward_pass

    def recorded(sae, sae_in, dead_neuron_mask, *args, **kwargs):
        _DEAD_COUNTS.append(0 if dead_neuron_mask is None else int(dead_neuron_mask.sum()))
        return forward(sae, sae_in, dead_neuron_mask, *args, **kwargs)

    sparse.sparse_training_forward_pass = recorded


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

    from irmlens.allocator import keep_freed_memory

    keep_freed_memory()  # as the irmlens and sae-train commands do, for both sides alike

    import datasets
    import sae_lens.cache_activations_runner as car
    from sae_lens.config import CacheActivationsRunnerConfig

    sys.path.insert(0, str(Path(__file__).parent))
    from cache_throughput import make_model

    p = argparse.ArgumentParser()
    p.add_argument("--arch", choices=("standard", "topk", "batchtopk"), default="standard")
    p.add_argument("--tokens", type=int, default=None, help="400,000; 200,000 for topk/batchtopk")
    p.add_argument("--width-mult", type=int, default=None, help="4; 16384 / 576 for topk")
    p.add_argument("--d-model", type=int, default=None, help="256; 576 for topk/batchtopk")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--l1", type=float, default=5.0)
    p.add_argument(
        "--precisions",
        default="float32,bf16",
        help="comma list: float32 (no autocast) and/or bf16 (autocast, both sides)",
    )
    args = p.parse_args()
    sparse_arch = args.arch != "standard"
    if args.tokens is None:
        args.tokens = 200_000 if sparse_arch else 400_000
    if args.d_model is None:
        args.d_model = 576 if sparse_arch else 256
    if sparse_arch and "--precisions" not in sys.argv:
        args.precisions = "float32"
    if sparse_arch and "," in args.precisions:
        p.error("--arch topk/batchtopk compares one precision per run (its bound is per run)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ctx, layer = 128, 3
    model = make_model(4 if sparse_arch else 6, args.d_model, 4096, ctx, device)
    hook = f"blocks.{layer}.hook_resid_post"
    n_rows = (args.tokens // ctx + 16 + 31) // 32 * 32  # + held-out rows; whole model batches
    tokens = torch.randint(1, 4096, (n_rows, ctx), generator=torch.Generator().manual_seed(0))
    d_in = model.cfg.d_model
    if args.width_mult is not None:
        d_sae = args.width_mult * d_in
    else:
        d_sae = 16384 if sparse_arch else 4 * d_in
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
        if sparse_arch:
            _record_dead_counts()
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

    if sparse_arch:
        _report_sparse(args, results, d_in, d_sae, device)
        return
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
    from sae_lens.registry import get_sae_training_class

    from sae_training.train import SAETrainingConfig, train_sae

    steps = args.tokens // args.batch
    if args.arch == "standard":
        sae_cfg = StandardTrainingSAEConfig(
            d_in=d_in,
            d_sae=d_sae,
            l1_coefficient=args.l1,
            l1_warm_up_steps=int(0.1 * steps),
            normalize_activations="expected_average_only_in",
        )
    else:
        sae_cfg = get_sae_training_class(args.arch)[1](
            d_in=d_in, d_sae=d_sae, k=args.k, normalize_activations="expected_average_only_in"
        )
    with tempfile.TemporaryDirectory() as tmp:
        ours_cfg = SAETrainingConfig(
            width=d_sae,
            architecture=args.arch,
            l1_coefficient=args.l1,
            k=args.k,
            lr=3e-4,
            batch_size=args.batch,
            epochs=1.0,
            device=device,
            autocast=autocast,
            trainer="auto" if args.arch == "standard" else "sparse",
        )
        t = time.perf_counter()
        ours = train_sae(train_acts, ours_cfg, hook, "bench")
        ours_tps = args.tokens / (time.perf_counter() - t)
        if args.arch != "standard":  # the same loop and batches with sae-lens's dense step
            dense_cfg = replace(ours_cfg, trainer="sae-lens")
            t = time.perf_counter()
            dense = train_sae(train_acts, dense_cfg, hook, "bench")
            _SAME_LOOP.update(
                tps=args.tokens / (time.perf_counter() - t), loss=heldout_mse(dense, heldout)
            )

        ltr.load_model = lambda *a, **k: model
        runner_cfg = LanguageModelSAERunnerConfig(
            sae=sae_cfg,
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

    if args.arch == "standard":
        loss_ours, loss_theirs = l1_loss(ours, heldout, args.l1), l1_loss(theirs, heldout, args.l1)
    else:
        loss_ours, loss_theirs = heldout_mse(ours, heldout), heldout_mse(theirs, heldout)
    return ours_tps, theirs_tps, loss_ours, loss_theirs


if __name__ == "__main__":
    main()

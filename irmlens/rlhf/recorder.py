"""Per-step RLHF metrics, the same for every trl trainer.

The reward function (or PPO's reward adapter) reports every scored batch to a ``RewardRecorder``;
a trainer callback merges those with the trainer's own KL and entropy logs into one
``metrics.jsonl`` row per logged step: mean/median reward, KL to the reference (nats per
completion), entropy, response length, reward-hacking signals and, every ``sample_every`` steps, a
few sample completions.
"""

from __future__ import annotations

import json
import statistics
import warnings
from pathlib import Path

from irmlens.rlhf.signals import lexicon_fraction, mean_words, repetition_rate

# Where each trainer logs its KL (and whether per token or per sequence) and entropy.
_KL_KEYS = {
    "grpo": ("kl", "per_token"),
    "rloo": ("kl", "per_token"),
    "ppo": ("objective/kl", "per_sequence"),
}
_ENTROPY_KEYS = {"grpo": "entropy", "rloo": "entropy", "ppo": "objective/entropy"}


class RewardRecorder:
    """Collects (completion, reward) pairs between two log events."""

    def __init__(self, word_utility) -> None:
        self.word_utility = word_utility
        self.texts: list[str] = []
        self.rewards: list[float] = []

    def add(self, texts: list[str], rewards: list[float]) -> None:
        self.texts.extend(texts)
        self.rewards.extend(rewards)

    def drain(self) -> tuple[list[str], list[float]]:
        texts, rewards = self.texts, self.rewards
        self.texts, self.rewards = [], []
        return texts, rewards


def metrics_row(
    step: int,
    logs: dict,
    texts: list[str],
    rewards: list[float],
    algorithm: str,
    word_utility,
    response_tokens: float | None,
    samples: list[dict] | None,
) -> dict:
    kl_key, kl_unit = _KL_KEYS[algorithm]
    row: dict = {"step": step}
    if rewards:
        row["reward_mean"] = statistics.fmean(rewards)
        row["reward_median"] = statistics.median(rewards)
        row["n_scored"] = len(rewards)
    tokens = response_tokens
    if tokens is None:
        tokens = _float(logs.get("completions/mean_length"))
    if tokens is not None:
        row["response_tokens"] = tokens
    kl = _float(logs.get(kl_key))
    if kl is not None:
        row["kl"] = kl * tokens if (kl_unit == "per_token" and tokens) else kl
    ent = _float(logs.get(_ENTROPY_KEYS[algorithm]))
    if ent is not None:  # per token: trl's PPO logs it summed over the completion
        row["entropy"] = ent / tokens if (algorithm == "ppo" and tokens) else ent
    if texts:
        row["response_words"] = mean_words(texts)
        row["repetition_rate"] = repetition_rate(texts)
        row["lexicon_fraction"] = lexicon_fraction(texts, word_utility)
    if samples:
        row["samples"] = samples
    row["trainer"] = {k: f for k, v in logs.items() if (f := _float(v)) is not None}
    return row


def _float(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def make_metrics_callback(
    path: Path,
    recorder: RewardRecorder,
    algorithm: str,
    sample_every: int,
    kl_warn_bound: float,
    response_tokens: float | None = None,
    step_offset: int = 0,
):
    """A transformers ``TrainerCallback`` appending unified rows to ``path``."""
    from transformers import TrainerCallback

    class MetricsToJsonl(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "train_runtime" in logs:
                return
            step = state.global_step + step_offset
            texts, rewards = recorder.drain()
            samples = None
            if texts and sample_every > 0 and (step % sample_every == 0 or step <= 1):
                samples = [
                    {"completion": t, "reward": r}
                    for t, r in list(zip(texts, rewards, strict=True))[:4]
                ]
            row = metrics_row(
                step,
                logs,
                texts,
                rewards,
                algorithm,
                recorder.word_utility,
                response_tokens,
                samples,
            )
            if row.get("kl", 0.0) > kl_warn_bound:
                warnings.warn(
                    f"RLHF step {step}: KL to the reference is {row['kl']:.1f} nats per completion, above "
                    f"rlhf.kl_warn_bound = {kl_warn_bound}; the policy may be reward hacking "
                    "(raise rlhf.kl_coef or lower the learning rate)",
                    stacklevel=2,
                )
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    return MetricsToJsonl()


def one_line_progress(trainer) -> None:
    """Replace the trainer's progress bar, which writes every step's raw log dict on a line of
    its own, with one bar whose postfix holds the reward and the KL (the full rows are in
    ``rlhf/metrics.jsonl``)."""
    from transformers.trainer_callback import ProgressCallback

    class OneLineProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or self.training_bar is None or not logs:
                return
            shown = {}
            for key, value in logs.items():
                name = key.split("/")[-1]
                if isinstance(value, float) and ("reward" in name or name in ("scores", "kl")):
                    shown[name] = f"{value:.3g}"
            if shown:
                self.training_bar.set_postfix(shown, refresh=True)

    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(OneLineProgress())

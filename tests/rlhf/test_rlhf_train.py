"""Each trl algorithm raises the reward of a trivially learnable RM; interrupted runs resume."""

import json

import pytest
from transformers import TrainerCallback

from irmlens.data.corpus import review_prompts
from irmlens.rewards.lexicon import LexiconRewardModel
from irmlens.rlhf.train import RLHFConfig, run_rlhf

# "the" and "," are among the most frequent tokens, so a few updates move their rate visibly.
EASY_RM = LexiconRewardModel({"the": 4.0, ",": 4.0}, name="easy")


def _cfg(algorithm, **kw):
    base = dict(
        algorithm=algorithm,
        steps=12,
        batch_size=32,
        mini_batch_size=16,
        ppo_epochs=2,
        num_generations=8,
        max_completion_length=10,
        kl_coef=0.05,
        learning_rate=2e-3,
        n_eval_prompts=64,
        checkpoint_every=100,
        sample_every=5,
    )
    base.update(kw)
    return RLHFConfig(**base)


@pytest.mark.parametrize("algorithm", ["ppo", "grpo", "rloo"])
def test_algorithm_raises_reward_of_easy_rm(algorithm, micro_base, tmp_path):
    base_dir, splits = micro_base
    prompts = review_prompts(splits.train, 200, 2, 6, seed=0)
    evals = review_prompts(splits.validation, 64, 2, 6, seed=1)
    s = run_rlhf(
        base_dir, EASY_RM, prompts, evals, _cfg(algorithm), tmp_path / "model", tmp_path / "rlhf"
    )
    assert s["reward_after"] > s["reward_before"] + 0.3, s
    assert s["kl"] > 0 and s["resumed_from_step"] == 0
    rows = [json.loads(x) for x in (tmp_path / "rlhf/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    for key in (
        "reward_mean",
        "reward_median",
        "kl",
        "entropy",
        "response_words",
        "repetition_rate",
        "lexicon_fraction",
    ):
        assert key in rows[-1], key
    assert any("samples" in r for r in rows)
    assert (tmp_path / "model/config.json").exists() and not (
        tmp_path / "rlhf/checkpoints"
    ).exists()
    # the saved policy stops at EOS like its base (trl's PPO clears eos_token_id while training)
    from transformers import AutoTokenizer, GenerationConfig

    eos = AutoTokenizer.from_pretrained(base_dir).eos_token_id
    assert GenerationConfig.from_pretrained(tmp_path / "model").eos_token_id == eos


class _Interrupt(TrainerCallback):
    """Raises at the n-th optimisation step, like a kill in the middle of training."""

    def __init__(self, at_step):
        self.at_step, self.seen = at_step, 0

    def on_step_end(self, args, state, control, **kwargs):
        self.seen += 1
        if self.seen == self.at_step:
            raise KeyboardInterrupt("simulated interruption")


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_interrupted_run_resumes_from_last_checkpoint(algorithm, micro_base, tmp_path):
    base_dir, splits = micro_base
    prompts = review_prompts(splits.train, 200, 2, 6, seed=0)
    evals = review_prompts(splits.validation, 16, 2, 6, seed=1)
    cfg = _cfg(algorithm, steps=6, checkpoint_every=2, n_eval_prompts=16)
    with pytest.raises(KeyboardInterrupt):
        run_rlhf(
            base_dir,
            EASY_RM,
            prompts,
            evals,
            cfg,
            tmp_path / "model",
            tmp_path / "rlhf",
            extra_callbacks=(_Interrupt(5),),
        )
    assert not (tmp_path / "model").exists()  # nothing half-written
    if algorithm == "grpo":  # a checkpoint cut short by a kill must be skipped, not loaded
        (tmp_path / "rlhf/checkpoints/checkpoint-5").mkdir()
    s = run_rlhf(base_dir, EASY_RM, prompts, evals, cfg, tmp_path / "model", tmp_path / "rlhf")
    assert s["resumed_from_step"] == 4
    steps = [
        json.loads(x)["step"] for x in (tmp_path / "rlhf/metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_null_controls_train_against_permuted_or_zero_reward(micro_base, tmp_path):
    base_dir, splits = micro_base
    prompts = review_prompts(splits.train, 100, 2, 6, seed=0)
    evals = review_prompts(splits.validation, 16, 2, 6, seed=1)
    vader_like = LexiconRewardModel(
        {f"w{i}": float(i % 7 - 3) for i in range(100)} | {"the": 4.0}, name="lex"
    )
    s = run_rlhf(
        base_dir,
        vader_like,
        prompts,
        evals,
        _cfg("ppo", steps=2, reward="zero"),  # (GRPO/RLOO refuse a zero reward: no advantage)
        tmp_path / "m",
        tmp_path / "r",
    )
    assert s["trained_against"] == "zero(lex)" and s["reward_model"] == "lex"
    rows = [json.loads(x) for x in (tmp_path / "r/metrics.jsonl").read_text().splitlines()]
    assert all(r["reward_mean"] == 0.0 for r in rows)


def test_bad_rlhf_config_values_are_refused():
    with pytest.raises(ValueError, match="algorithm"):
        RLHFConfig(algorithm="dpo")
    with pytest.raises(ValueError, match="reward"):
        RLHFConfig(reward="random")
    with pytest.raises(ValueError, match="multiple of rlhf.num_generations"):
        RLHFConfig(algorithm="grpo", batch_size=30, num_generations=8)

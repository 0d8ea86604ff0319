"""irmlens.rlhf.signals and RLHFConfig's checks."""

import pytest

from irmlens.rlhf.signals import lexicon_fraction, repetition_rate
from irmlens.rlhf.train import RLHFConfig


def test_signals_count_words_not_punctuation():
    # same words, different amounts of punctuation: the signals must not move
    plain = ["great fun and a good film"]
    punctuated = ["great , fun , and . a good film . . ."]
    assert repetition_rate(plain) == repetition_rate(punctuated) == 0.0
    assert repetition_rate(["good good film ."]) == pytest.approx(1 / 3)
    utility = {"great": 3.1, "fun": 2.3, "good": 1.9}.get
    assert lexicon_fraction(plain, utility) == lexicon_fraction(punctuated, utility) == 0.5


@pytest.mark.parametrize(
    "values, message",
    [
        ({"algorithm": "grpo", "reward": "zero"}, "zero reward trains nothing"),
        ({"algorithm": "rloo", "num_generations": 1, "batch_size": 8}, "num_generations"),
        ({"prompt_min_words": 12}, "exceeds rlhf.prompt_max_words"),
        ({"mini_batch_size": 0}, "mini_batch_size = 0"),
        ({"n_eval_prompts": 0}, "n_eval_prompts = 0"),
    ],
)
def test_rlhf_settings_that_cannot_work_are_refused(values, message):
    with pytest.raises(ValueError, match=message):
        RLHFConfig(**values)

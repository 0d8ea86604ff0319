import pytest
import torch

from irmlens.irm.implicit import word_implicit_rewards


def test_word_implicit_reward_sums_a_words_tokens_and_averages_occurrences():
    # row: BOS, "gr" "eat" (word 0), ",", "fun" (word 1), "gr" "eat" (word 0), pad
    log_ratio = torch.tensor([[0.0, 0.5, 1.0, 7.0, -2.0, 0.1, 0.3, 9.0]])
    valid = torch.tensor([[False, True, True, True, True, True, True, False]])
    word_id = torch.tensor([[-1, -1, 0, -1, 1, -1, 0, -1]])
    in_word = torch.tensor([[False, True, True, False, True, True, True, False]])
    got = word_implicit_rewards(log_ratio, valid, word_id, in_word, beta=0.5)
    # the punctuation token (7.0) is not part of any word
    assert got[0] == pytest.approx(0.5 * ((0.5 + 1.0) + (0.1 + 0.3)) / 2)
    assert got[1] == pytest.approx(0.5 * -2.0)
    last_only = word_implicit_rewards(log_ratio, valid, word_id, None)
    assert last_only[0] == pytest.approx((1.0 + 0.3) / 2)

"""Reward models. The paper's is a token-utility lexicon (VADER): the true reward is known."""

from irmlens.rewards.lexicon import LexiconRewardModel, RewardModel, load_lexicon

__all__ = ["LexiconRewardModel", "RewardModel", "load_lexicon"]

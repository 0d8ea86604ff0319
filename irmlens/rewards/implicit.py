"""The implicit-reward lexicon of an RM-free study (``data.lexicon = "none"``): the words of the
cached text with their model-level implicit reward (stage ``target`` writes the table), read as a
lexicon reward model."""

from __future__ import annotations

import statistics
from pathlib import Path

from irmlens.errors import ConfigError
from irmlens.rewards.lexicon import MIN_LEXICON_WORDS, LexiconRewardModel


def read_implicit_table(path: Path) -> dict[str, tuple[float, int]]:
    """word -> (implicit reward, occurrences) from a ``word<TAB>value<TAB>n`` table with a
    header line."""
    out = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines()[1:]:  # header
        if line:
            word, value, n = line.split("\t")
            out[word] = (float(value), int(n))
    return out


class ImplicitRewardModel(LexiconRewardModel):
    """A cached word seen too rarely has no utility, even where stripping its punctuation would
    find another word's (``film,`` is not scored as ``film``), so the IRM's targets are exactly
    the words the table keeps; a generated word the cache never saw is matched like any lexicon
    word."""

    def __init__(self, lexicon: dict[str, float], rare: set[str]) -> None:
        super().__init__(lexicon, name="implicit reward")
        self.rare = set(rare)

    def word_utility(self, word: str) -> float | None:
        return None if word.lower() in self.rare else super().word_utility(word)


def implicit_reward_model(table_path: Path, min_count: int) -> ImplicitRewardModel:
    """Each word seen ``min_count`` times or more scores its implicit reward divided by their
    standard deviation (so the lexicon labeler's thresholds read in standard deviations; every
    rank statistic is unchanged); a text scores the paper's clip(sum / 5, -10, 10)."""
    if not Path(table_path).exists():
        raise ConfigError(
            "data.lexicon = 'none': the implicit reward is read off the pair after the cache "
            "stage (stage target), and was asked for before it"
        )
    table = read_implicit_table(table_path)
    words = {w: v for w, (v, n) in table.items() if n >= min_count}
    if len(words) < MIN_LEXICON_WORDS:
        raise ConfigError(
            f"data.lexicon = 'none': only {len(words)} words occur {min_count} or more times in "
            "the cached text: lower data.implicit_min_count or raise cache.max_rows"
        )
    sd = statistics.pstdev(words.values()) or 1.0
    rare = {w for w, (_, n) in table.items() if n < min_count}
    return ImplicitRewardModel({w: v / sd for w, v in words.items()}, rare)

"""Reward-hacking signals of a batch of completions (pure functions)."""

from __future__ import annotations

from collections.abc import Callable, Sequence


def _words(text: str) -> list[str]:
    """Whitespace tokens with a letter in them: punctuation tokens ("," ".") are not words, and
    counting them would let a policy move both signals by emitting more or less punctuation."""
    return [w for w in text.split() if any(c.isalpha() for c in w)]


def repetition_rate(texts: Sequence[str]) -> float:
    """Fraction of words that repeat an earlier word of the same completion (0: no repeats)."""
    repeated = total = 0
    for text in texts:
        words = _words(text)
        total += len(words)
        repeated += len(words) - len(set(words))
    return repeated / total if total else 0.0


def lexicon_fraction(texts: Sequence[str], word_utility: Callable[[str], float | None]) -> float:
    """Fraction of words in the completions that the reward model's lexicon scores."""
    hits = total = 0
    for text in texts:
        for w in _words(text):
            total += 1
            hits += word_utility(w) is not None
    return hits / total if total else 0.0


def mean_words(texts: Sequence[str]) -> float:
    return sum(len(t.split()) for t in texts) / len(texts) if texts else 0.0

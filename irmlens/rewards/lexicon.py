"""The paper's token-utility reward model: reward = clip(sum of word utilities / 5, -10, 10)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from irmlens.errors import LexiconFormatError

_STRIP = "\"'.,!?;:()[]{}"


@runtime_checkable
class RewardModel(Protocol):
    """Anything that scores texts. Lexicon RMs also expose per-word utilities."""

    name: str

    def score(self, texts: Sequence[str]) -> list[float]: ...


def load_lexicon(path: str | Path) -> dict[str, float]:
    """Read ``word<TAB>utility`` lines (extra tab-separated columns, as in VADER's file, are ignored).

    Blank lines and lines starting with ``#`` are skipped; a malformed line raises an error
    naming the file and line number.
    """
    path = Path(path)
    if not path.exists():
        raise LexiconFormatError(f"lexicon file {path} does not exist")
    lexicon: dict[str, float] = {}
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.rstrip("\r")
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) < 2 or not fields[0].strip():
            raise LexiconFormatError(
                f"{path}, line {lineno}: expected 'word<TAB>utility', got {line[:80]!r}"
            )
        try:
            value = float(fields[1])
        except ValueError:
            raise LexiconFormatError(
                f"{path}, line {lineno}: utility {fields[1][:40]!r} is not a number "
                "(expected 'word<TAB>utility')"
            ) from None
        if not math.isfinite(value):
            raise LexiconFormatError(f"{path}, line {lineno}: utility must be finite")
        lexicon[fields[0].strip().lower()] = value
    if not lexicon:
        raise LexiconFormatError(f"lexicon file {path} has no entries")
    return lexicon


class LexiconRewardModel:
    """Sum of per-word utilities, scaled and clipped like the paper's VADER reward.

    Words are whitespace-separated; a word not in the lexicon is retried with surrounding
    punctuation stripped (so ``great,`` counts as ``great``).
    """

    def __init__(
        self,
        lexicon: Mapping[str, float],
        scale: float = 5.0,
        clip: float = 10.0,
        name: str = "lexicon",
    ) -> None:
        if scale <= 0 or clip <= 0:
            raise ValueError("scale and clip must be positive")
        self.lexicon = dict(lexicon)
        self.scale = scale
        self.clip = clip
        self.name = name

    @classmethod
    def from_file(cls, path: str | Path, **kwargs) -> LexiconRewardModel:
        kwargs.setdefault("name", Path(path).stem)
        return cls(load_lexicon(path), **kwargs)

    def word_utility(self, word: str) -> float | None:
        """Utility of one word, or None when the lexicon does not know it."""
        w = word.lower()
        if w in self.lexicon:
            return self.lexicon[w]
        stripped = w.strip(_STRIP)
        if stripped and stripped in self.lexicon:
            return self.lexicon[stripped]
        return None

    def raw_utility(self, text: str) -> float:
        return sum(u for w in text.split() if (u := self.word_utility(w)) is not None)

    def score(self, texts: Sequence[str]) -> list[float]:
        out = []
        for text in texts:
            r = self.raw_utility(text) / self.scale
            out.append(max(-self.clip, min(self.clip, r)))
        return out

    def shuffled(self, seed: int = 0) -> LexiconRewardModel:
        """Same words, utilities permuted among them: the null RM for the IRM's null-pair control."""
        import random

        words = sorted(self.lexicon)
        values = [self.lexicon[w] for w in words]
        random.Random(seed).shuffle(values)
        return LexiconRewardModel(
            dict(zip(words, values, strict=True)),
            self.scale,
            self.clip,
            name=f"{self.name}-shuffled",
        )


class ZeroRewardModel:
    """Reward 0 for every text: RLHF then optimises only the KL term (the KL-only null pair).

    It keeps the lexicon for ``word_utility`` so that reward-hacking signals and the IRM's scoring
    still refer to the true RM.
    """

    def __init__(self, reference: LexiconRewardModel) -> None:
        self.reference = reference
        self.name = f"zero({reference.name})"

    def word_utility(self, word: str) -> float | None:
        return self.reference.word_utility(word)

    def score(self, texts: Sequence[str]) -> list[float]:
        return [0.0 for _ in texts]

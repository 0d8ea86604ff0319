"""The paper's token-utility reward model: reward = clip(sum of word utilities / 5, -10, 10)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from irmlens.errors import LexiconFormatError

_STRIP = "\"'.,!?;:()[]{}"

# The IRM splits the lexicon's words into fit and held-out sets (5 or more held out), and its
# controls permute utilities among them: a lexicon with fewer distinct words cannot be studied.
MIN_LEXICON_WORDS = 10
# Distinct lexicon words that must occur in the study's text: checked at study start here, and
# by the IRM's word split (irmlens.irm.fit.split_words) on the cached tokens.
MIN_CORPUS_LEXICON_WORDS = 10
# No real utility comes near this (VADER's run from -3.9 to 3.4): the reward is
# clip(sum / 5, -10, 10), so one word beyond +-50 already pins every text it occurs in to the clip,
# and values like 1e308 overflow the sums to inf.
MAX_ABS_UTILITY = 1e6

# sha256 of the VADER lexicon files that are accepted with duplicate words (see load_lexicon):
# vaderSentiment 3.3.2's vader_lexicon.txt, and the word<TAB>utility file irmlens.data.assets
# normalises it to (the shipped lexicon, vader_lexicon.tsv in the data cache).
VADER_LEXICON_SHA256 = frozenset(
    {
        "1ec9c6e9ee19aade328f8beb393a6afa71a5bb3acf7d3cc22d4ef568df374bf5",  # vader_lexicon.txt
        "2febecfbfac7467d172c666f6e8a67b4b2ed6d65a8d089a9e7c746ea2b988ddf",  # vader_lexicon.tsv
    }
)


@runtime_checkable
class RewardModel(Protocol):
    """Anything that scores texts. Lexicon RMs also expose per-word utilities."""

    name: str

    def score(self, texts: Sequence[str]) -> list[float]: ...


def _decode(path: Path, raw: bytes) -> str:
    """UTF-8 text without a leading byte-order mark (Windows editors write one; left in, it
    would become part of the first word)."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        lineno = raw.count(b"\n", 0, e.start) + 1
        raise LexiconFormatError(
            f"{path}, line {lineno}: not UTF-8 text (byte {e.start} is {raw[e.start : e.start + 1]!r});"
            " a lexicon file must be UTF-8. Fix: re-save it as UTF-8, e.g. "
            f"`iconv -f latin1 -t utf-8 {path.name} > utf8-{path.name}`"
        ) from None


def load_lexicon(path: str | Path, *, min_words: int = MIN_LEXICON_WORDS) -> dict[str, float]:
    """Read ``word<TAB>utility`` lines (extra tab-separated columns, as in VADER's file, are ignored).

    The file must be UTF-8 (a leading byte-order mark is dropped); CRLF line ends are accepted.
    Blank lines and lines starting with ``#`` are skipped. Words are stripped and lower-cased,
    as they are matched (see ``LexiconRewardModel.word_utility``).

    Every problem raises ``LexiconFormatError`` naming the file, the line(s) and the fix, before
    any stage of a study runs: a malformed line, a utility that is not a finite number or whose
    magnitude exceeds ``MAX_ABS_UTILITY``, a word given twice with different utilities, fewer
    than ``min_words`` distinct words, or utilities that are all equal (no reward signal).

    Duplicates: a word given twice (after lower-casing: ``Good`` and ``good`` are one word) with
    the same utility is merged, since nothing is ambiguous. With different utilities it is an
    error, except in the shipped VADER lexicon (recognised by its sha256, ``VADER_LEXICON_SHA256``):
    vaderSentiment's own file repeats 23 words once lower-cased (26 extra rows: ``:D``/``:d``,
    ``lol`` as 2.9 and 1.8, ``d:`` as -2.9 and 1.2, ...), 15 of them with different values; there
    the last value is kept, as irmlens always has (and as vaderSentiment's dict does for exact
    repeats), so the paper's reward and its 7,494 words are unchanged.
    """
    path = Path(path)
    if not path.exists():
        raise LexiconFormatError(f"lexicon file {path} does not exist")
    if not path.is_file():
        raise LexiconFormatError(f"lexicon path {path} is not a file")
    raw = path.read_bytes()
    keep_last = hashlib.sha256(raw).hexdigest() in VADER_LEXICON_SHA256
    lexicon: dict[str, float] = {}
    entries: dict[str, list[tuple[int, float]]] = {}  # word -> (line, utility) of each of its lines
    for lineno, raw_line in enumerate(_decode(path, raw).splitlines(), start=1):
        line = raw_line.rstrip("\r")
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
        if abs(value) > MAX_ABS_UTILITY:
            raise LexiconFormatError(
                f"{path}, line {lineno}: utility {fields[1].strip()[:40]} is out of range: "
                f"|utility| must be at most {MAX_ABS_UTILITY:,.0f} (VADER's utilities run from -4 to "
                "4; the reward clip(sum / 5, -10, 10) saturates on any single word beyond +-50). "
                "Fix: rescale the lexicon's utilities"
            )
        word = fields[0].strip().lower()
        entries.setdefault(word, []).append((lineno, value))
        lexicon[word] = value
    conflicts = [(w, e) for w, e in entries.items() if not keep_last and len({v for _, v in e}) > 1]
    if conflicts:
        shown = "; ".join(
            f"{w!r} on lines " + ", ".join(f"{n} ({v:g})" for n, v in e[:-1]) + " and "
            f"{e[-1][0]} ({e[-1][1]:g})"
            for w, e in conflicts[:5]
        )
        more = f" and {len(conflicts) - 5} more" if len(conflicts) > 5 else ""
        raise LexiconFormatError(
            f"{path}: {len(conflicts)} word(s) given more than once with different utilities: {shown}{more}"
            " (words are matched lower-case, so 'Good' and 'good' are one word). "
            "Fix: keep one line per word"
        )
    if not lexicon:
        raise LexiconFormatError(f"lexicon file {path} has no entries")
    if len(lexicon) < min_words:
        raise LexiconFormatError(
            f"lexicon file {path} has only {len(lexicon)} distinct word(s) "
            f"({', '.join(repr(w) for w in sorted(lexicon)[:5])}); the IRM splits the lexicon's "
            f"words into fit and held-out sets and needs at least {min_words}. "
            "Fix: use a larger lexicon (the shipped VADER lexicon has 7,494 words)"
        )
    values = set(lexicon.values())
    if len(values) == 1:
        raise LexiconFormatError(
            f"lexicon file {path}: all {len(lexicon)} utilities are {values.pop():g}, so the "
            "reward gives no signal and there is nothing to rank words by. "
            "Fix: give the words their (differing) utilities"
        )
    return lexicon


def _lexicon_key(lexicon: Mapping[str, float], word: str) -> str | None:
    """The lexicon entry a whitespace-separated word counts as: the word lower-cased, else with
    surrounding punctuation stripped (``great,`` counts as ``great``); None when unknown."""
    w = word.lower()
    if w in lexicon:
        return w
    stripped = w.strip(_STRIP)
    if stripped and stripped in lexicon:
        return stripped
    return None


def _lexicon_of(rm_or_lexicon) -> Mapping[str, float]:
    if isinstance(rm_or_lexicon, Mapping):
        return rm_or_lexicon
    if isinstance(getattr(rm_or_lexicon, "lexicon", None), Mapping):
        return rm_or_lexicon.lexicon
    if getattr(rm_or_lexicon, "reference", None) is not None:  # ZeroRewardModel
        return _lexicon_of(rm_or_lexicon.reference)
    raise TypeError(
        f"expected a lexicon reward model or a word -> utility mapping, got {type(rm_or_lexicon)}"
    )


def lexicon_word_counts(rm_or_lexicon, texts: Sequence[str]) -> dict[str, int]:
    """How often each lexicon word occurs in ``texts`` (matched as ``check_lexicon_coverage``
    matches them); words that never occur are left out."""
    lexicon = _lexicon_of(rm_or_lexicon)
    counts: dict[str, int] = {}
    for text in texts:
        for w in text.split():
            k = _lexicon_key(lexicon, w)
            if k is not None:
                counts[k] = counts.get(k, 0) + 1
    return counts


def check_lexicon_coverage(
    rm_or_lexicon, texts: Sequence[str], min_words: int = MIN_CORPUS_LEXICON_WORDS
) -> dict:
    """Check that enough distinct lexicon words occur in ``texts``; return the counts for logging.

    Call it at study start with the held-out review texts: the IRM is fit and scored on lexicon
    words that occur in the cached text (it holds out 5 or more of them), so a lexicon that does
    not match the corpus (another language, another domain) would otherwise run every stage of the
    study and only fail at the IRM. Words are matched as ``LexiconRewardModel.word_utility``
    matches them (whitespace split, lower-case, surrounding punctuation stripped).

    ``rm_or_lexicon``: a ``LexiconRewardModel`` (or ``ZeroRewardModel``, whose reference lexicon is
    used) or a word -> utility mapping. Raises ``LexiconFormatError`` when fewer than ``min_words``
    distinct lexicon words occur. Returns ``n_words_in_corpus`` (distinct lexicon words occurring),
    ``n_lexicon_words``, ``n_texts`` and ``n_texts_with_lexicon_words``.
    """
    if min_words < 1:
        raise ValueError(f"min_words = {min_words}: must be 1 or more")
    lexicon = _lexicon_of(rm_or_lexicon)
    found: set[str] = set()
    n_texts_with = 0
    for text in texts:
        keys = lexicon_word_counts(lexicon, [text]).keys()
        if keys:
            n_texts_with += 1
            found |= keys
    counts = {
        "n_words_in_corpus": len(found),
        "n_lexicon_words": len(lexicon),
        "n_texts": len(texts),
        "n_texts_with_lexicon_words": n_texts_with,
    }
    if len(found) < min_words:
        name = getattr(rm_or_lexicon, "name", None)
        which = f"lexicon {name!r}" if name else "the lexicon"
        seen = f" ({', '.join(repr(w) for w in sorted(found)[:5])})" if found else ""
        raise LexiconFormatError(
            f"only {len(found)} distinct word(s) of {which} ({len(lexicon)} words) occur in the "
            f"{len(texts)} texts{seen}, in {n_texts_with} of them; the IRM is fit and scored on "
            f"lexicon words that occur in the cached text and needs at least {min_words}. "
            "Fix: use a lexicon in the corpus's language and vocabulary, or give more text "
            "(data.n_heldout, cache.max_rows)"
        )
    return counts


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
        key = _lexicon_key(self.lexicon, word)
        return None if key is None else self.lexicon[key]

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

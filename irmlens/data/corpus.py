"""Movie-review corpus: loading, deterministic splits, RLHF prompts, and word spans."""

from __future__ import annotations

import csv
import random
import re
from dataclasses import dataclass
from pathlib import Path

WORD_RE = re.compile(r"\S+")


@dataclass(frozen=True)
class Review:
    label: int  # +1 positive, -1 negative
    text: str


@dataclass(frozen=True)
class ReviewSplits:
    train: list[Review]
    validation: list[Review]
    heldout: list[Review]


def load_reviews(path: str | Path) -> list[Review]:
    """Read ``label,text`` rows (labels 1/-1, UTF-8 with BOM); newlines inside a review become spaces."""
    reviews = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        for row in csv.reader(f):
            if len(row) < 2:
                continue
            text = " ".join(row[1].split())
            reviews.append(Review(int(row[0]), text))
    return reviews


def split_reviews(
    reviews: list[Review], n_validation: int, n_heldout: int, seed: int = 0
) -> ReviewSplits:
    """Shuffle once with ``seed`` and cut into train / validation / held-out.

    The held-out reviews are never seen by pretraining or RLHF: activations are cached on them.
    """
    if n_validation + n_heldout >= len(reviews):
        raise ValueError(
            f"n_validation + n_heldout = {n_validation + n_heldout} leaves no training reviews "
            f"out of {len(reviews)}"
        )
    order = list(range(len(reviews)))
    random.Random(seed).shuffle(order)
    shuffled = [reviews[i] for i in order]
    val = shuffled[:n_validation]
    held = shuffled[n_validation : n_validation + n_heldout]
    train = shuffled[n_validation + n_heldout :]
    return ReviewSplits(train=train, validation=val, heldout=held)


def longest_sentence(reviews: list[Review]) -> int:
    """Words in the longest sentence of ``reviews`` (what ``review_prompts`` can cut from)."""
    longest = 0
    for review in reviews:
        begin = 0
        for i, w in enumerate(review.text.split()):
            if w in {".", "!", "?"}:
                longest = max(longest, i + 1 - begin)
                begin = i + 1
    return longest


def review_prompts(
    reviews: list[Review], n_prompts: int, min_words: int, max_words: int, seed: int = 0
) -> list[str]:
    """Prefixes of ``min_words``..``max_words`` words taken from sentence starts of the reviews."""
    rng = random.Random(seed)
    starts: list[list[str]] = []
    for review in reviews:
        words = review.text.split()
        begin = 0
        for i, w in enumerate(words):
            if w in {".", "!", "?"}:
                if i + 1 - begin > max_words:
                    starts.append(words[begin : i + 1])
                begin = i + 1
    if not starts:
        raise ValueError("no sentence in these reviews is long enough to cut a prompt from")
    prompts = []
    for _ in range(n_prompts):
        sentence = rng.choice(starts)
        k = rng.randint(min_words, max_words)
        prompts.append(" ".join(sentence[:k]))
    return prompts


def word_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of whitespace-separated words (the corpus is already tokenised by spaces)."""
    return [m.span() for m in WORD_RE.finditer(text)]

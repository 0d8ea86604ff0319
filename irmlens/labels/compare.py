"""Pure functions that compare labels with the IRM's weights and with each other (the paper's
validation by labels): share related, sign agreement, AUROC of |weight| for "related", and
Cohen's kappa between two labelers."""

from __future__ import annotations

from collections.abc import Sequence

RELATED = ("positive", "negative")


def share_related(labels: Sequence[str | None]) -> float | None:
    """Share of parsed labels that say related (positive or negative); None if none parsed."""
    parsed = [x for x in labels if x is not None]
    return sum(x in RELATED for x in parsed) / len(parsed) if parsed else None


def sign_agreement(weights: Sequence[float], labels: Sequence[str | None]) -> float | None:
    """Among features labelled positive or negative with a non-zero weight: the share whose
    weight's sign matches the label's polarity (positive weight <-> positive label)."""
    pairs = [(w, x) for w, x in zip(weights, labels, strict=True) if x in RELATED and w != 0]
    if not pairs:
        return None
    return sum((w > 0) == (x == "positive") for w, x in pairs) / len(pairs)


def auroc(scores: Sequence[float], positive: Sequence[bool]) -> float | None:
    """Area under the ROC curve of ``scores`` for ``positive`` (Mann-Whitney U / n_pos n_neg, ties
    counted half); None when either class is empty."""
    pos = [s for s, p in zip(scores, positive, strict=True) if p]
    neg = [s for s, p in zip(scores, positive, strict=True) if not p]
    if not pos or not neg:
        return None
    ranked = sorted((s, i) for i, s in enumerate(list(pos) + list(neg)))
    ranks = [0.0] * len(ranked)
    i = 0
    while i < len(ranked):  # average ranks over ties
        j = i
        while j + 1 < len(ranked) and ranked[j + 1][0] == ranked[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[ranked[k][1]] = (i + j) / 2 + 1
        i = j + 1
    u = sum(ranks[: len(pos)]) - len(pos) * (len(pos) + 1) / 2
    return u / (len(pos) * len(neg))


def cohen_kappa(a: Sequence[str | None], b: Sequence[str | None]) -> float | None:
    """Cohen's kappa of two labelers over the items both labelled; None if fewer than 2 such
    items, 1.0 when both agree on a single category throughout."""
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    if len(pairs) < 2:
        return None
    n = len(pairs)
    observed = sum(x == y for x, y in pairs) / n
    cats = {x for x, _ in pairs} | {y for _, y in pairs}
    expected = sum(
        (sum(x == c for x, _ in pairs) / n) * (sum(y == c for _, y in pairs) / n) for c in cats
    )
    if expected == 1.0:
        return 1.0
    return (observed - expected) / (1 - expected)

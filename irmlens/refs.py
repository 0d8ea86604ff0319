"""A feature is always (dictionary, layer, index): one label and one HTML anchor for it, used by
the report, the cards, the exports, ``Study`` and the explorer, so that no table, chart or link
names a feature by its index alone (index 38 of layer 1 is not index 38 of layer 2)."""

from __future__ import annotations

import re


def feature_label(dictionary: str, layer: int, index: int) -> str:
    """``shared layer 1 #302``: how every page and table names a feature."""
    return f"{dictionary} layer {layer} #{index}"


def feature_anchor(dictionary: str, layer: int, index: int) -> str:
    """The HTML id of a feature's card (``feature-shared-1-302``)."""
    slug = re.sub(r"[^A-Za-z0-9_]+", "-", str(dictionary)).strip("-") or "dictionary"
    return f"feature-{slug}-{layer}-{index}"


def card_ref(card: dict) -> tuple[str, int, int]:
    """A card's (dictionary, layer, index); cards written before cards named their dictionary
    are the shared dictionary's."""
    return card.get("dictionary", "shared"), card["layer"], card["feature"]

"""The ``lexicon`` labeler: offline and deterministic, for any ``word<TAB>utility`` reward model.

A feature is related to the reward when much of its activation falls on lexicon words and those
words' activation-weighted mean utility is far from neutral:

* ``lexicon_mass`` = activation at lexicon words / all its activation on the cached text;
* ``mean_utility`` = sum over lexicon words of activation x utility / activation at lexicon words.

``positive`` if ``lexicon_mass >= min_mass`` and ``mean_utility >= min_utility``, ``negative`` if
``mean_utility <= -min_utility``, else ``unrelated``. The defaults (0.25 of the mass, |utility| >=
0.5 on VADER's -4..4 scale, about an eighth of its range) are a reading of "mostly about valenced
words"; both are settings (``LexiconLabelerConfig``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from irmlens.labels import FeatureEvidence, FeatureLabel


@dataclass(frozen=True)
class LexiconLabelerConfig:
    min_mass: float = 0.25
    min_utility: float = 0.5


class LexiconLabeler:
    name = "lexicon"

    def __init__(
        self, utility: Callable[[str], float | None], cfg: LexiconLabelerConfig | None = None
    ) -> None:
        self.utility, self.cfg = utility, cfg or LexiconLabelerConfig()

    def label(self, evidence: list[FeatureEvidence]) -> list[FeatureLabel]:
        return [self._one(e) for e in evidence]

    def _one(self, e: FeatureEvidence) -> FeatureLabel:
        on_lexicon = weighted = 0.0
        top: list[tuple[float, str, float]] = []
        for word, act in e.word_activation.items():
            u = self.utility(word)
            if u is None or act <= 0:
                continue
            on_lexicon += act
            weighted += act * u
            top.append((act, word, u))
        mass = on_lexicon / e.total_activation if e.total_activation > 0 else 0.0
        mean_u = weighted / on_lexicon if on_lexicon > 0 else 0.0
        c = self.cfg
        if mass >= c.min_mass and mean_u >= c.min_utility:
            label = "positive"
        elif mass >= c.min_mass and mean_u <= -c.min_utility:
            label = "negative"
        else:
            label = "unrelated"
        words = ", ".join(f"{w} ({u:+.1f})" for _, w, u in sorted(top, reverse=True)[:5])
        explanation = (
            f"{mass:.0%} of its activation on lexicon words, activation-weighted utility "
            f"{mean_u:+.2f}" + (f"; most on {words}" if words else "")
        )
        return FeatureLabel(
            e.feature,
            label,
            explanation,
            self.name,
            e.contexts,
            scores={"lexicon_mass": mass, "mean_utility": mean_u},
        )

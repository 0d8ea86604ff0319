"""Reward-relevance labels of dictionary features: is a feature related to the reward model
(``positive`` / ``negative``) or ``unrelated``? The paper asked GPT-4; irmlens has labelers behind
one interface (``FeatureLabeler``): ``lexicon`` (offline, deterministic: from where a feature
fires on the cached text and the utilities of the words there) and ``llm`` (an instruction-tuned LM shown the
feature's top contexts). Labels are then compared with the features the IRM weights most
(``irmlens.labels.compare``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol

LABELS = ("positive", "negative", "unrelated")


@dataclass
class Context:
    """One top-activating context of a feature: its tokens, the feature's activation on each, and
    which of them is the position it was picked for."""

    tokens: list[str]
    activations: list[float]
    focus: int


@dataclass
class FeatureEvidence:
    """What a labeler may look at for one feature. ``word_activation``: the feature's summed
    activation at the end of each word of the cached text (word -> sum), ``total_activation`` its
    sum over all positions (words, punctuation, padding-free), ``contexts`` its top contexts."""

    feature: int
    contexts: list[Context]
    word_activation: dict[str, float] = field(default_factory=dict)
    total_activation: float = 0.0


@dataclass
class FeatureLabel:
    feature: int
    label: str | None  # one of LABELS, or None: the labeler's answer could not be parsed
    explanation: str
    labeler: str
    contexts: list[Context] = field(default_factory=list)
    prompt: str | None = None  # the LLM labeler's prompt and raw answer
    answer: str | None = None
    scores: dict[str, float] = field(default_factory=dict)  # the lexicon labeler's numbers

    def to_dict(self) -> dict:
        return asdict(self)


class FeatureLabeler(Protocol):
    name: str

    def label(self, evidence: list[FeatureEvidence]) -> list[FeatureLabel]: ...


def evidence_from_activations(
    feature: int,
    activations,
    word_id,
    words: list[str],
    contexts: list[Context] | None = None,
) -> FeatureEvidence:
    """A feature's evidence from its activation at every cached position (``activations``
    [n_pos]) and the cache's word ids there (``word_id`` [n_pos], -1 where no word ends: inside
    a word, punctuation): its summed activation per word, and in all."""
    import torch

    acts = torch.as_tensor(activations, dtype=torch.float64).clamp_min(0)
    wid = torch.as_tensor(word_id, dtype=torch.long)
    at_words = wid >= 0
    sums = torch.zeros(len(words), dtype=torch.float64).index_add_(0, wid[at_words], acts[at_words])
    nz = torch.nonzero(sums > 0).squeeze(-1).tolist()
    return FeatureEvidence(
        feature, contexts or [], {words[i]: float(sums[i]) for i in nz}, float(acts.sum())
    )

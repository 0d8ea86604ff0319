"""Reward-relevance labelers and the comparisons of labels with IRM weights."""

import pytest
import torch

from irmlens.labels import Context, FeatureEvidence, evidence_from_activations
from irmlens.labels.compare import auroc, cohen_kappa, share_related, sign_agreement
from irmlens.labels.lexicon import LexiconLabeler, LexiconLabelerConfig
from irmlens.labels.llm import LLMLabeler, build_prompt, parse_answer

WORDS = ["great", "awful", "movie", "plot", "the"]
UTILITY = {"great": 3.1, "awful": -3.0}


def _cache():
    """A cached text as word ids per position (-1: punctuation or inside a word)."""
    torch.manual_seed(0)
    word_id = torch.randint(-1, len(WORDS), (2000,))
    return word_id


def _fires_on(word_id, targets):
    """Activation 1 + noise where the position is one of ``targets`` (word ids, or -1), else 0."""
    hit = torch.isin(word_id, torch.tensor(targets))
    return hit.float() * (1 + torch.rand(len(word_id)))


def test_the_lexicon_labeler_finds_valenced_features_and_not_punctuation():
    wid = _cache()
    labeler = LexiconLabeler(UTILITY.get)
    cases = {
        "positive": [0],  # "great"
        "negative": [1],  # "awful"
        "unrelated": [-1],  # punctuation only: no word there at all
    }
    evidence = [
        evidence_from_activations(i, _fires_on(wid, t), wid, WORDS)
        for i, t in enumerate(cases.values())
    ]
    neutral = evidence_from_activations(9, _fires_on(wid, [2, 3]), wid, WORDS)  # movie, plot
    labels = labeler.label(evidence + [neutral])
    assert [x.label for x in labels] == ["positive", "negative", "unrelated", "unrelated"]
    assert labels[0].scores["lexicon_mass"] == pytest.approx(1.0)
    assert labels[0].scores["mean_utility"] == pytest.approx(3.1)
    assert labels[2].scores["lexicon_mass"] == 0.0
    assert "great (+3.1)" in labels[0].explanation
    # mixed: half of its mass on "great", half on "the": positive only under a low mass bar
    mixed = evidence_from_activations(5, _fires_on(wid, [0, 4]), wid, WORDS)
    assert 0.4 < labeler.label([mixed])[0].scores["lexicon_mass"] < 0.6
    strict = LexiconLabeler(UTILITY.get, LexiconLabelerConfig(min_mass=0.7))
    assert strict.label([mixed])[0].label == "unrelated"


@pytest.mark.parametrize(
    "answer, label",
    [
        ("Description: praise words\nLabel: positive", "positive"),
        ("**Description:** insults\n**Label:** Negative.", "negative"),
        ("Description: commas\nLabel - unrelated", "unrelated"),
        ("Label: positive or negative", None),  # two labels: not a label
        ("Label: maybe", None),
        ("I think this feature is about movies.", None),  # no label line
        ("", None),
        ("Description: x\nLabel: unrelated\nLabel: positive", "unrelated"),  # the first one
    ],
)
def test_llm_answers_are_parsed_or_counted_as_unparseable(answer, label):
    assert parse_answer(answer)[0] == label


def test_the_prompt_marks_the_focus_token():
    ctx = Context(["the", "acting", "is", "great"], [0, 0, 0.1, 2.0], focus=3)
    p = build_prompt(FeatureEvidence(1, [ctx]), "VADER sentiment of the words")
    assert "1. the acting is [[great]]" in p and "VADER sentiment" in p


class _Scripted:
    """A chat backend with canned answers (the real ones are HF and OpenAI-compatible)."""

    name = "scripted"

    def __init__(self, answers):
        self.answers, self.calls = list(answers), 0

    def complete(self, prompts):
        self.calls += len(prompts)
        return [self.answers.pop(0) for _ in prompts]


def test_the_llm_labeler_caches_answers_and_resumes(tmp_path):
    ctx = [Context(["a", "good", "film"], [0, 1, 0], 1)]
    ev = [FeatureEvidence(i, ctx) for i in range(3)]
    ev[1].contexts = [Context(["bad"], [1.0], 0)]
    ev[2].contexts = [Context(["!"], [1.0], 0)]
    first = _Scripted(["Label: positive", "Description: d\nLabel: negative", "no idea"])
    labels = LLMLabeler(first, "VADER", cache_dir=tmp_path, batch_size=2).label(ev)
    assert [x.label for x in labels] == ["positive", "negative", None]
    assert labels[2].answer == "no idea" and labels[1].explanation == "d"
    again = _Scripted([])  # everything comes from the cache: the backend is not asked
    assert [x.label for x in LLMLabeler(again, "VADER", cache_dir=tmp_path).label(ev)] == [
        "positive",
        "negative",
        None,
    ]
    assert again.calls == 0


def test_comparisons():
    assert cohen_kappa(list("ppnn"), list("pnnn")) == pytest.approx(0.5)
    assert cohen_kappa(list("ppnn"), list("ppnn")) == 1.0
    assert cohen_kappa(["p", None], ["p", "n"]) is None  # one item labelled by both
    assert auroc([3, 2, 1, 0], [True, True, False, False]) == 1.0
    assert auroc([0, 1, 2, 3], [True, True, False, False]) == 0.0
    assert auroc([1, 1, 1, 1], [True, False, True, False]) == 0.5
    assert auroc([1, 2], [True, True]) is None
    assert share_related(["positive", "unrelated", None, "negative"]) == pytest.approx(2 / 3)
    assert (
        sign_agreement([0.5, -1.0, 2.0, 0.0], ["positive", "positive", "unrelated", "negative"])
        == 0.5
    )

"""References the IRM is read against (irmlens.irm.references) on word scores whose answer is
known."""

from types import SimpleNamespace

import numpy as np
import pytest

from irmlens.irm.references import lens_reference


def _targets(n: int = 60, seed: int = 0):
    rng = np.random.default_rng(seed)
    return SimpleNamespace(utility={w: float(u) for w, u in enumerate(rng.normal(size=n))})


def test_lens_reference_scores_the_lens_like_the_irm_on_the_words_it_can_spell():
    t = _targets()
    irm = {w: u + 0.5 * np.sin(w) for w, u in t.utility.items()}  # a noisy IRM
    perfect = {w: 2 * u for w, u in t.utility.items() if w % 3}  # a third unspellable
    scrambled = {w: -u for w, u in t.utility.items()}
    row = lens_reference({4: perfect, 5: scrambled}, 4, t, irm, seed=0, top_tokens=["good"])
    assert row["heldout_kendall_tau"] == pytest.approx(1.0)
    assert row["n_heldout_words"] == 40 and row["layer"] == 4 and row["top_tokens"] == ["good"]
    assert row["by_layer"] == {"4": pytest.approx(1.0), "5": pytest.approx(-1.0)}
    lo, hi = row["difference_ci"]  # IRM minus a perfect lens: below 0
    assert lo <= hi < 0 and row["irm_heldout_kendall_tau_same_words"] < 1


def test_lens_reference_refuses_too_few_words():
    t = _targets(10)
    with pytest.raises(ValueError, match="too few"):
        lens_reference({0: {1: 0.3}}, 0, t, dict(t.utility), seed=0)

"""Where the IRM and the reward model disagree, word by word, and which features say so."""

from __future__ import annotations

from collections.abc import Callable

import torch


def word_divergence(
    heldout_irm: dict[int, float],
    targets,
    held: torch.Tensor,
    held_word: torch.Tensor,
    coef: torch.Tensor,
    feature_ref: Callable[[int], dict],
    top: int = 5,
) -> list[dict]:
    """Per held-out word: standardised IRM minus standardised true utility, and the ``top``
    features contributing most to its IRM value (mean feature change there x coefficient),
    sorted from most under- to most over-valued."""
    words = sorted(heldout_irm)
    irm_v = torch.tensor([heldout_irm[w] for w in words], dtype=torch.float64)
    true_v = torch.tensor([targets.utility[w] for w in words], dtype=torch.float64)
    z = (irm_v - irm_v.mean()) / irm_v.std().clamp_min(1e-12) - (
        true_v - true_v.mean()
    ) / true_v.std().clamp_min(1e-12)

    def attribution(w: int) -> list[dict]:
        contrib = (held[held_word == w].double().mean(0)) * coef
        idx = torch.argsort(contrib.abs(), descending=True)[:top].tolist()
        return [{"feature": j, **feature_ref(j), "contribution": float(contrib[j])} for j in idx]

    rows = [
        {
            "word": targets.words[w],
            "true": targets.utility[w],
            "irm": heldout_irm[w],
            "divergence": float(zv),
            "top_features": attribution(w),
        }
        for w, zv in zip(words, z.tolist(), strict=True)
    ]
    rows.sort(key=lambda d: d["divergence"])
    return rows


def most_divergent(rows: list[dict], n: int = 10) -> list[dict]:
    """The ``n`` most over-valued words then the ``n`` most under-valued (no word in both)."""
    n_show = min(n, len(rows) // 2)
    return rows[len(rows) - n_show :][::-1] + rows[:n_show]

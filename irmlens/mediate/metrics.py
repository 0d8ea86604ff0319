"""Deterministic reward metrics on fixed text, per row, and shares of the RLHF gain with
bootstrap CIs over rows (rows resampled jointly across the arms they pair)."""

from __future__ import annotations

import torch


def expected_utility(
    logits: torch.Tensor, utility: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Per row, the mean over its valid positions of ``sum_v softmax(logits)_v u(v)``: the
    reward the policy expects from its next token (``utility`` [vocab], 0 where the reward
    model scores nothing; ``mask`` [rows, positions])."""
    per_position = logits.float().softmax(-1) @ utility.float()
    m = mask.float()
    return (per_position * m).sum(1) / m.sum(1).clamp_min(1.0)


def token_utility(tokenizer, word_utility, vocab_size: int) -> torch.Tensor:
    """``u(v)``: the reward model's utility of each vocabulary item read as a word (stripped of
    its leading space and case), 0 for tokens it does not score."""
    u = torch.zeros(vocab_size)
    for v in range(min(vocab_size, len(tokenizer))):
        word = tokenizer.decode([v]).strip().lower()
        if word:
            u[v] = float(word_utility(word) or 0.0)
    return u


def share(patched: torch.Tensor, base: torch.Tensor, rlhf: torch.Tensor, removed: bool) -> float:
    """The share of the gain ``mean(rlhf) - mean(base)`` a patch removes (``removed``: from the
    RLHF model, ``(rlhf - patched) / gain``) or reproduces (in the base, ``(patched - base) /
    gain``); NaN when there is no gain."""
    gain = float(rlhf.mean() - base.mean())
    if abs(gain) < 1e-12:
        return float("nan")
    moved = float(rlhf.mean() - patched.mean()) if removed else float(patched.mean() - base.mean())
    return moved / gain


def share_ci(
    patched: torch.Tensor,
    base: torch.Tensor,
    rlhf: torch.Tensor,
    removed: bool,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``share`` with its 95% percentile bootstrap CI, the rows resampled jointly."""
    gen = torch.Generator().manual_seed(seed)
    n = len(base)
    idx = torch.randint(0, n, (n_boot, n), generator=gen)
    p, b, r = patched.double()[idx].mean(1), base.double()[idx].mean(1), rlhf.double()[idx].mean(1)
    gain = r - b
    moved = (r - p) if removed else (p - b)
    ok = gain.abs() > 1e-12
    boots = (moved[ok] / gain[ok]) if ok.any() else torch.tensor([float("nan")])
    lo, hi = torch.quantile(boots, torch.tensor([0.025, 0.975], dtype=boots.dtype)).tolist()
    return share(patched, base, rlhf, removed), lo, hi

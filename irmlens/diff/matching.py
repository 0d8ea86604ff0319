"""Feature matching between dictionaries: Hungarian one-to-one on decoder cosine, and MMCS."""

from __future__ import annotations

import torch


def decoder_cosines(w_a: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every decoder row of ``w_a`` [n_a, d] with every row of ``w_b`` [n_b, d]."""
    a = torch.nn.functional.normalize(w_a.detach().double(), dim=1)
    b = torch.nn.functional.normalize(w_b.detach().double(), dim=1)
    return a @ b.T


def hungarian_match(
    w_a: torch.Tensor, w_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One-to-one matching maximising total decoder cosine. Returns (rows of a, rows of b, cosines)."""
    from scipy.optimize import linear_sum_assignment

    cos = decoder_cosines(w_a, w_b)
    r, c = linear_sum_assignment(cos.numpy(), maximize=True)
    r, c = torch.from_numpy(r), torch.from_numpy(c)
    return r, c, cos[r, c]


def mmcs(w_small: torch.Tensor, w_large: torch.Tensor) -> float:
    """Mean max cosine similarity (the paper's), with one-to-one Hungarian matching: the mean cosine
    between each feature of the smaller dictionary and its matched feature in the larger one."""
    if w_small.shape[0] > w_large.shape[0]:
        w_small, w_large = w_large, w_small
    return float(hungarian_match(w_small, w_large)[2].mean())

"""Feature cards: what one dictionary feature reads and writes, in the base and the RLHF model.

A card holds, for one shared-SAE feature: its top-activating contexts in each model (token
windows with per-token activations, for highlighting) and samples from each quantile band of its
activations, activation histograms of both models on the same bins, the tokens its decoder
direction promotes and suppresses through the unembedding (the logit lens, final norm ignored),
its divergence numbers, IRM weight and matched partner.
Pure functions over tensors; the pipeline supplies codes, tokens and the unembedding.
"""

from __future__ import annotations

import torch


def _positions(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (row, column) of each code row (codes are over valid positions in row-major order,
    the cache's layout), and each position's code row (-1 outside the valid positions)."""
    flat_index = torch.full(valid.shape, -1, dtype=torch.long)
    flat_index[valid] = torch.arange(int(valid.sum()))
    rows, cols = torch.nonzero(valid, as_tuple=True)
    return rows, cols, flat_index


def _window(
    col: torch.Tensor,
    tokens: torch.Tensor,
    valid: torch.Tensor,
    where: tuple,
    i: int,
    token_str,
    before: int,
    after: int,
    window_text,
) -> dict:
    """The context around code row ``i``: its tokens and the feature's activation on each."""
    rows, cols, flat_index = where
    r, c = int(rows[i]), int(cols[i])
    lo, hi = max(0, c - before), min(valid.shape[1], c + after + 1)
    ids, acts = [], []
    for p in range(lo, hi):
        if p > c and not valid[r, p]:
            break
        ids.append(int(tokens[r, p]))
        j = int(flat_index[r, p])
        acts.append(float(col[j]) if j >= 0 else 0.0)
    toks = window_text(ids) if window_text is not None else [token_str(t) for t in ids]
    return {"tokens": toks, "activations": acts, "focus": c - lo, "max": float(col[i])}


def top_contexts(
    codes: torch.Tensor,
    tokens: torch.Tensor,
    valid: torch.Tensor,
    token_str,
    feature: int,
    k: int = 5,
    before: int = 8,
    after: int = 2,
    window_text=None,
) -> list[dict]:
    """The ``k`` positions where ``feature`` is most active. ``codes`` are over valid positions in
    row-major order (the cache's layout); each context lists its tokens and the feature's
    activation on each (0 where outside the valid positions). ``window_text`` (ids -> one
    string per id, e.g. ``token_pieces``) gives the tokens as they read in the text, spaces
    included; otherwise each is ``token_str`` of its id alone."""
    col = codes[:, feature].float()
    if float(col.max()) <= 0:
        return []
    where = _positions(valid)
    out = []
    for i in torch.argsort(col, descending=True)[:k].tolist():
        if col[i] <= 0:
            break
        out.append(_window(col, tokens, valid, where, i, token_str, before, after, window_text))
    return out


def quantile_contexts(
    codes: torch.Tensor,
    tokens: torch.Tensor,
    valid: torch.Tensor,
    token_str,
    feature: int,
    bands: int = 4,
    per_band: int = 2,
    before: int = 8,
    after: int = 2,
    window_text=None,
) -> list[dict]:
    """Samples from each quantile band of the feature's non-zero activations (lowest band
    first), as SAE dashboards show them: the top contexts alone say what a feature does at its
    strongest, not what most of its firings are. Each band holds ``per_band`` contexts spread
    evenly through it (deterministic: no sampling), and its activation range."""
    col = codes[:, feature].float()
    firing = torch.nonzero(col > 0).flatten()
    if not len(firing):
        return []
    firing = firing[torch.argsort(col[firing], stable=True)]  # ascending activation
    where, n, out = _positions(valid), len(firing), []
    for b in range(bands):
        lo, hi = b * n // bands, (b + 1) * n // bands
        if hi <= lo:
            continue
        picks = sorted({lo + int((s + 0.5) * (hi - lo) / per_band) for s in range(per_band)})
        out.append(
            {
                "band": f"{100 * b // bands}-{100 * (b + 1) // bands}%",
                "low": float(col[firing[lo]]),
                "high": float(col[firing[hi - 1]]),
                "contexts": [
                    _window(
                        col,
                        tokens,
                        valid,
                        where,
                        int(firing[i]),
                        token_str,
                        before,
                        after,
                        window_text,
                    )
                    for i in picks
                ],
            }
        )
    return out


def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """Each token of ``ids`` as it reads in their decoded text, its leading space included: the
    difference between decoding the prefix with and without it (a word-level tokenizer's
    decoder puts the spaces between tokens; decoding one token alone loses them). Where a
    prefix does not extend the previous one (a byte-level token splitting a character), the
    token decoded alone."""
    out, prev = [], ""
    for j in range(len(ids)):
        text = tokenizer.decode(ids[: j + 1])
        out.append(text[len(prev) :] if text.startswith(prev) else tokenizer.decode([ids[j]]))
        prev = text
    return out


def activation_histograms(
    base: torch.Tensor, rlhf: torch.Tensor, feature: int, bins: int = 20
) -> dict:
    """Histograms of the feature's non-zero activations in both models on shared bin edges."""
    b = base[:, feature].float()
    r = rlhf[:, feature].float()
    nz_b, nz_r = b[b > 0], r[r > 0]
    top = float(torch.cat([nz_b, nz_r]).max()) if len(nz_b) + len(nz_r) else 1.0
    edges = torch.linspace(0.0, max(top, 1e-6), bins + 1)
    return {
        "edges": edges.tolist(),
        "base": torch.histogram(nz_b, bins=edges)[0].tolist(),
        "rlhf": torch.histogram(nz_r, bins=edges)[0].tolist(),
        "zero_fraction_base": float((b <= 0).float().mean()),
        "zero_fraction_rlhf": float((r <= 0).float().mean()),
    }


def logit_effects(w_dec_row: torch.Tensor, w_u: torch.Tensor, token_str, k: int = 8) -> dict:
    """Tokens whose logits the decoder direction raises and lowers most (``w_dec_row @ W_U``)."""
    logits = w_dec_row.float() @ w_u.float()
    up = torch.topk(logits, k)
    down = torch.topk(-logits, k)
    return {
        "promoted": [
            {"token": token_str(int(i)), "logit": float(v)}
            for v, i in zip(up.values, up.indices, strict=True)
        ],
        "suppressed": [
            {"token": token_str(int(i)), "logit": -float(v)}
            for v, i in zip(down.values, down.indices, strict=True)
        ],
    }

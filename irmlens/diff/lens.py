"""The activation difference lens (Minder et al., arXiv 2510.13900): the mean tuned-minus-base
residual difference over the first few tokens of text unrelated to the tuning, read through the
tuned model's unembedding (the logit lens). A narrow fine-tuning leaves its objective readable
there, with no dictionary at all.

Their code (science-of-finetuning ``diffing-toolkit``, ``methods/activation_difference_lens``)
takes the first 5 positions of 10,000 pretraining samples at the middle layer and keeps one mean
per position; we average positions 1..k after BOS (BOS itself carries no text) of the held-out
rows, at any layer given. Pure functions: activations and a HookedTransformer in, tensors out.
"""

from __future__ import annotations

import torch

# the lens's positions per row (Minder et al. use the first 5 tokens of unrelated text)
LENS_FIRST_K = 5


def mean_difference(
    base: torch.Tensor, tuned: torch.Tensor, valid: torch.Tensor, first_k: int = 5
) -> torch.Tensor:
    """``[d]``: the mean of ``tuned - base`` over each row's first ``first_k`` valid positions.

    ``base``/``tuned``: ``[n_valid, d]`` activations at the valid positions of token rows, row-
    major (the paired cache's layout); ``valid``: the rows' ``[n_rows, n_ctx]`` mask."""
    if first_k < 1:
        raise ValueError(f"first_k = {first_k}: the lens needs at least one position per row")
    rank = valid.long().cumsum(dim=1)[valid]  # 1 for a row's first valid position, 2 ...
    keep = rank <= first_k
    if not bool(keep.any()):
        raise ValueError("no valid positions to average: the rows are empty")
    return (tuned[keep].double() - base[keep].double()).mean(0).float()


@torch.no_grad()
def logit_lens(model, vector: torch.Tensor) -> torch.Tensor:
    """``[d_vocab]`` logits of ``vector`` read by ``model``'s final norm and unembedding
    (a HookedTransformer), centred on their mean."""
    v = vector.to(next(model.parameters()).device, model.cfg.dtype)[None, None]
    logits = model.unembed(model.ln_final(v))[0, 0].float().cpu()
    return logits - logits.mean()


def word_scores(token_logits: torch.Tensor, tokenizer, words: list[str]) -> dict[str, float]:
    """A score per word: the lens logit of the first token of `` word`` (the form a word takes
    inside text), for the words the tokenizer can spell without an unknown token."""
    unk = getattr(tokenizer, "unk_token_id", None)
    out = {}
    for w in words:
        ids = tokenizer(" " + w, add_special_tokens=False)["input_ids"]
        if ids and (unk is None or ids[0] != unk):
            out[w] = float(token_logits[ids[0]])
    return out

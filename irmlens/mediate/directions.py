"""The reward direction read through the model's output: which tokens a direction in the residual
stream promotes and suppresses, through the final norm and unembedding (the logit lens) and
through the unembedding alone (a direction's own logit effect, without the norm's rescaling and
centring, which the lens is known to distort early in the model)."""

from __future__ import annotations

import torch


@torch.no_grad()
def read_direction(model, vector: torch.Tensor, tokenizer, k: int = 10) -> dict:
    """The ``k`` tokens ``vector`` promotes most and suppresses most, with and without the final
    norm (a HookedTransformer ``model``); logits centred on their mean."""
    from irmlens.diff.lens import logit_lens

    v = vector.to(next(model.parameters()).device, model.cfg.dtype)
    plain = (v @ model.W_U).float().cpu()
    out = {}
    for name, logits in (("final_norm", logit_lens(model, vector)), ("unembedding", plain)):
        logits = logits - logits.mean()
        out[name] = {
            "promoted": [tokenizer.decode([t]) for t in logits.topk(k).indices.tolist()],
            "suppressed": [tokenizer.decode([t]) for t in (-logits).topk(k).indices.tolist()],
        }
    return out

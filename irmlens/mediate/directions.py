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


@torch.no_grad()
def decompose(
    basis,
    direction: torch.Tensor,
    base_acts: torch.Tensor,
    rlhf_acts: torch.Tensor,
    site,
    ref: tuple[str, int],
    sizes: tuple[int, ...] = (1, 4, 16, 64),
) -> dict:
    """``direction`` (the mean RLHF - base difference) as the dictionary ``basis`` writes it:
    each feature's mean code change times its decoder direction, projected on the direction.
    Features ranked by the size of that projection; for the top m, the cumulative share of the
    direction's norm they write and the share of the site's gain patching them removes (their
    causal share). ``ref``: (dictionary, layer) naming the features."""
    from irmlens.mediate.curves import component_changes, component_directions, set_share

    d = direction.shape[-1]
    unit = direction / direction.norm().clamp_min(1e-12)
    change = component_changes(basis, base_acts, rlhf_acts).reshape(-1, basis.cfg.d_sae)
    dirs = component_directions(basis, d)
    along = change.mean(0) * (dirs @ unit)  # each feature's part of the direction
    order = torch.argsort(along.abs(), descending=True, stable=True)
    norm = float(direction.norm())
    cosine = torch.nn.functional.cosine_similarity(dirs, unit[None], dim=1)
    dictionary, layer = ref
    return {
        "dictionary": dictionary,
        "layer": layer,
        "cumulative": [
            {
                "n_features": m,
                "norm_share": float(along[order[:m]].sum()) / norm if norm else 0.0,
                "causal_share": set_share(basis, site, order[:m].tolist(), True),
            }
            for m in sizes
            if m <= len(order)
        ],
        "top": [
            {
                "dictionary": dictionary,
                "layer": layer,
                "feature": int(j),
                "norm_share": float(along[j]) / norm if norm else 0.0,
                "cosine": float(cosine[j]),
            }
            for j in order[:10].tolist()
        ],
    }


@torch.no_grad()
def moved_contexts(
    direction: torch.Tensor,
    base_acts: torch.Tensor,
    rlhf_acts: torch.Tensor,
    tokens: torch.Tensor,
    tokenizer,
    k: int = 10,
    before: int = 10,
) -> list[dict]:
    """The ``k`` positions where the RLHF - base difference projects most on ``direction``
    (``[rows, positions, d]`` activations on ``tokens``), each with the text before it and its
    token."""
    unit = direction / direction.norm().clamp_min(1e-12)
    projection = (rlhf_acts - base_acts).float() @ unit.float()  # [rows, positions]
    top = projection.flatten().topk(min(k, projection.numel())).indices.tolist()
    n_pos = projection.shape[1]
    out = []
    for i in top:
        r, p = divmod(i, n_pos)
        out.append(
            {
                "row": r,
                "position": p,
                "projection": float(projection[r, p]),
                "context": tokenizer.decode(tokens[r, max(1, p - before) : p].tolist()),
                "token": tokenizer.decode([int(tokens[r, p])]),
            }
        )
    return out

"""SAE evaluations that need the language model: CE loss recovered with the SAE spliced in."""

from __future__ import annotations

import torch


@torch.no_grad()
def ce_loss_recovered(
    model, sae, hook: str, tokens: torch.Tensor, valid: torch.Tensor, batch_size: int = 16
) -> dict:
    """Next-token loss with the hook's activation replaced by the SAE reconstruction, against the
    clean model and zero-ablation: recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean).

    Loss is averaged over positions whose *target* token is real (``valid`` shifted by one).
    """
    device = next(model.parameters()).device
    sums = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    count = 0

    def splice(act, hook=None):
        flat = act.reshape(-1, act.shape[-1]).float()
        return sae(flat.to(sae.W_enc.device)).to(act.dtype).reshape(act.shape)

    def zero(act, hook=None):
        return torch.zeros_like(act)

    for i in range(0, len(tokens), batch_size):
        toks = tokens[i : i + batch_size].to(device)
        mask = valid[i : i + batch_size, 1:].to(device)
        runs = {
            "clean": model(toks, return_type="loss", loss_per_token=True),
            "sae": model.run_with_hooks(
                toks, return_type="loss", loss_per_token=True, fwd_hooks=[(hook, splice)]
            ),
            "zero": model.run_with_hooks(
                toks, return_type="loss", loss_per_token=True, fwd_hooks=[(hook, zero)]
            ),
        }
        for k, loss in runs.items():
            sums[k] += float(loss[mask].sum())
        count += int(mask.sum())
    ce = {k: v / max(count, 1) for k, v in sums.items()}
    denom = ce["zero"] - ce["clean"]
    return {
        "ce_clean": ce["clean"],
        "ce_sae": ce["sae"],
        "ce_zero_ablation": ce["zero"],
        # undefined (None) when zero-ablation is not worse than the clean model, e.g. a policy so far
        # from the text distribution that its clean loss is already worse than knowing nothing
        "ce_loss_recovered": (ce["zero"] - ce["sae"]) / denom if denom > 0 else None,
    }

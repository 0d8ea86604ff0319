"""Dictionary evaluations that need the language model: CE loss recovered with the SAE's (or a
crosscoder's) reconstruction spliced in."""

from __future__ import annotations

from collections.abc import Callable

import torch


@torch.no_grad()
def ce_loss_recovered(
    model, sae, hook: str, tokens: torch.Tensor, valid: torch.Tensor, batch_size: int = 16
) -> dict:
    """Next-token loss with the hook's activation replaced by the SAE reconstruction, against the
    clean model and zero-ablation: recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean).

    Loss is averaged over positions whose *target* token is real (``valid`` shifted by one).
    """

    def splice(act: torch.Tensor) -> torch.Tensor:
        flat = act.reshape(-1, act.shape[-1]).float()
        return sae(flat.to(sae.W_enc.device)).to(act.dtype).reshape(act.shape)

    return _ce_recovered(model, hook, tokens, valid, batch_size, lambda i: splice)


@torch.no_grad()
def crosscoder_ce_loss_recovered(
    models: dict, cc, hook: str, tokens: torch.Tensor, valid: torch.Tensor, batch_size: int = 16
) -> dict[str, dict]:
    """CE loss recovered per model (``models``: name -> HookedTransformer, in the crosscoder's
    decoder order), each model's own reconstruction spliced in; the crosscoder is fed every
    model's activation at the hook on the same tokens."""
    names = list(models)
    layer = int(hook.split(".")[1])

    def all_acts(toks: torch.Tensor) -> torch.Tensor:
        acts = []
        for m in names:
            _, cache = models[m].run_with_cache(toks, names_filter=hook, stop_at_layer=layer + 1)
            acts.append(cache[hook].float())
        return torch.stack(acts, dim=2)  # [batch, pos, n_models, d]

    # every batch's reconstructions once, for all models, before any spliced forward (a model's
    # own forward cannot run inside its hook, and each slot reads the same crosscoder pass)
    recons = []
    for i in range(0, len(tokens), batch_size):
        x = all_acts(tokens[i : i + batch_size].to(next(models[names[0]].parameters()).device))
        recons.append(cc(x.reshape(-1, *x.shape[2:]).to(cc.W_enc.device)).view(*x.shape))
    out = {}
    for slot, name in enumerate(names):

        def prepare(i: int, slot: int = slot):
            recon = recons[i // batch_size][:, :, slot]
            return lambda act: recon.to(act.device, act.dtype)

        out[name] = _ce_recovered(models[name], hook, tokens, valid, batch_size, prepare)
    return out


def _ce_recovered(
    model,
    hook: str,
    tokens: torch.Tensor,
    valid: torch.Tensor,
    batch_size: int,
    prepare: Callable[[int], Callable[[torch.Tensor], torch.Tensor]],
) -> dict:
    """CE clean / spliced / zero-ablated; ``prepare(i)`` gives the splice of the batch starting
    at row ``i`` (the hook activation -> its reconstruction)."""
    device = next(model.parameters()).device
    sums = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    count = 0

    def zero(act, hook=None):
        return torch.zeros_like(act)

    for i in range(0, len(tokens), batch_size):
        toks = tokens[i : i + batch_size].to(device)
        mask = valid[i : i + batch_size, 1:].to(device)

        replace = prepare(i)

        def splice(act, hook=None, replace=replace):
            return replace(act)

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

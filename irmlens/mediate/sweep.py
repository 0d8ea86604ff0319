"""The layer sweep: the base model's activations patched into the RLHF model at one site (on the
same tokens) remove some share of the RLHF gain; the RLHF model's patched into the base reproduce
some. Sites: the embedding (``blocks.0.hook_resid_pre``) and each block's ``hook_resid_post``;
what remains after patching the last block's output lives in the final norm and the unembedding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from irmlens.mediate.metrics import expected_utility, share_ci


@torch.no_grad()
def run_metric(model, tokens, mask, utility, patches: dict[str, torch.Tensor] | None = None):
    """Per-row expected utility of ``model`` on ``tokens``, with the activations at each hook of
    ``patches`` replaced (TransformerLens hook names)."""
    hooks = [(name, replacing(value)) for name, value in (patches or {}).items()]
    logits = model.run_with_hooks(tokens, fwd_hooks=hooks) if hooks else model(tokens)
    return expected_utility(logits, utility, mask)


def replacing(value: torch.Tensor):
    """A TransformerLens hook that puts ``value`` in place of the activation it sees."""

    def hook(act, hook):  # noqa: ARG001 (TransformerLens passes the hook point)
        return value.to(act.device, act.dtype)

    return hook


def sweep_sites(n_layers: int) -> list[str]:
    """The embedding, then every block's output."""
    return ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(n_layers)]


@torch.no_grad()
def layer_sweep(
    base,
    rlhf,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    utility: torch.Tensor,
    sites: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Per site, the share of the gain removed (base patched into RLHF) and reproduced (RLHF
    patched into base), each with its bootstrap CI over rows; the unpatched metrics; and the
    share left to the final norm and unembedding (1 - the last block's removed share)."""
    sites = list(sites or sweep_sites(rlhf.cfg.n_layers))
    _, cache_b = base.run_with_cache(tokens, names_filter=lambda n: n in sites)
    _, cache_r = rlhf.run_with_cache(tokens, names_filter=lambda n: n in sites)
    m_base = run_metric(base, tokens, mask, utility)
    m_rlhf = run_metric(rlhf, tokens, mask, utility)
    rows = []
    for site in sites:
        removed = run_metric(rlhf, tokens, mask, utility, {site: cache_b[site]})
        reproduced = run_metric(base, tokens, mask, utility, {site: cache_r[site]})
        r = share_ci(removed, m_base, m_rlhf, True, n_boot, seed)
        p = share_ci(reproduced, m_base, m_rlhf, False, n_boot, seed)
        rows.append(
            {
                "site": site,
                "removed": r[0],
                "removed_ci": [r[1], r[2]],
                "reproduced": p[0],
                "reproduced_ci": [p[1], p[2]],
            }
        )
    last = rows[-1]["removed"]
    return {
        "metric": "expected next-token utility",
        "base": float(m_base.mean()),
        "rlhf": float(m_rlhf.mean()),
        "n_rows": int(len(tokens)),
        "sites": rows,
        "final_norm_and_unembedding": 1.0 - last,
    }

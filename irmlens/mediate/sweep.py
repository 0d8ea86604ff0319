"""The layer sweep: the base model's activations patched into the RLHF model at one site (on the
same tokens) remove some share of the RLHF gain; the RLHF model's patched into the base reproduce
some. Sites: the embedding (``blocks.0.hook_resid_pre``) and each block's ``hook_resid_post``
(and, where asked, each block's ``hook_mlp_out``: the MLP's write alone); what remains after
patching the last block's output lives in the final norm and the unembedding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from irmlens.mediate.metrics import share_ci

Metrics = Callable[[torch.Tensor], dict[str, torch.Tensor]]  # logits -> name -> per row


@torch.no_grad()
def run_metrics(
    model, tokens: torch.Tensor, metrics: Metrics, patches: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Per-row ``metrics`` of ``model`` on ``tokens``, with the activations at each hook of
    ``patches`` replaced (TransformerLens hook names)."""
    hooks = [(name, replacing(value)) for name, value in (patches or {}).items()]
    logits = model.run_with_hooks(tokens, fwd_hooks=hooks) if hooks else model(tokens)
    return metrics(logits)


def patched_metrics(
    model, tokens: torch.Tensor, metrics: Metrics, site: str, value: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``metrics`` of ``model`` on ``tokens`` with ``site``'s activations replaced by ``value``
    (differentiable in ``value``: the curves' attribution needs its gradient; the sweep calls
    it under ``no_grad``). A block's output (``blocks.L.hook_resid_post``) is the whole
    residual stream there, so the model is run on from block L+1 (``start_at_layer``): the
    blocks before it would compute what is replaced, and skipping them halves the sweep's cost
    on average (the same logits: a test checks it)."""
    import re

    after = re.fullmatch(r"blocks\.(\d+)\.hook_resid_post", site)
    if after is None:
        return metrics(model.run_with_hooks(tokens, fwd_hooks=[(site, replacing(value))]))
    x = value.to(next(model.parameters()).device, model.cfg.dtype)
    return metrics(model(x, start_at_layer=int(after.group(1)) + 1))


def replacing(value: torch.Tensor):
    """A TransformerLens hook that puts ``value`` in place of the activation it sees."""

    def hook(act, hook):  # noqa: ARG001 (TransformerLens passes the hook point)
        return value.to(act.device, act.dtype)

    return hook


def _mean_ci(x: torch.Tensor, n_boot: int, seed: int) -> list[float]:
    """The 95% percentile bootstrap CI of ``x``'s mean over rows."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(x), (n_boot, len(x)), generator=gen)
    boots = x.double()[idx].mean(1)
    return torch.quantile(boots, torch.tensor([0.025, 0.975], dtype=boots.dtype)).tolist()


def sweep_sites(n_layers: int, mlp_out: bool = False) -> list[str]:
    """The embedding, then every block's output (and its MLP's output before it)."""
    sites = ["blocks.0.hook_resid_pre"]
    for i in range(n_layers):
        sites += [f"blocks.{i}.hook_mlp_out"] if mlp_out else []
        sites.append(f"blocks.{i}.hook_resid_post")
    return sites


@torch.no_grad()
def layer_sweep(
    base,
    rlhf,
    tokens: torch.Tensor,
    metrics: Metrics,
    sites: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict]:
    """Per metric: per site, the share of the gain removed (base patched into RLHF) and
    reproduced (RLHF patched into base), each with its bootstrap CI over rows; the unpatched
    means; and the share left to the final norm and unembedding (1 - the last block output's
    removed share)."""
    sites = list(sites or sweep_sites(rlhf.cfg.n_layers))
    # the unpatched metrics from the same passes that cache the sites' activations
    logits_b, cache_b = base.run_with_cache(tokens, names_filter=lambda n: n in sites)
    logits_r, cache_r = rlhf.run_with_cache(tokens, names_filter=lambda n: n in sites)
    m_base, m_rlhf = metrics(logits_b), metrics(logits_r)
    del logits_b, logits_r
    patched = [
        (
            site,
            patched_metrics(rlhf, tokens, metrics, site, cache_b[site]),
            patched_metrics(base, tokens, metrics, site, cache_r[site]),
        )
        for site in sites
    ]
    out = {}
    for name in m_base:
        rows = []
        for site, removed, reproduced in patched:
            r = share_ci(removed[name], m_base[name], m_rlhf[name], True, n_boot, seed)
            p = share_ci(reproduced[name], m_base[name], m_rlhf[name], False, n_boot, seed)
            rows.append(
                {
                    "site": site,
                    "removed": r[0],
                    "removed_ci": [r[1], r[2]],
                    "reproduced": p[0],
                    "reproduced_ci": [p[1], p[2]],
                }
            )
        last = [r for r in rows if r["site"].endswith("hook_resid_post")][-1]["removed"]
        gain_ci = _mean_ci(m_rlhf[name] - m_base[name], n_boot, seed)
        out[name] = {
            "metric": name,
            "base": float(m_base[name].mean()),
            "rlhf": float(m_rlhf[name].mean()),
            "gain_ci": gain_ci,
            # a gain whose CI holds 0 has no share to split: its shares are noise over noise
            "gain_resolved": bool(gain_ci[0] > 0 or gain_ci[1] < 0),
            "n_rows": int(len(tokens)),
            "sites": rows,
            "final_norm_and_unembedding": 1.0 - last,
        }
    return out

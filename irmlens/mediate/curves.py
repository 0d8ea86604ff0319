"""Faithfulness curves: in which basis is the RLHF change at one site compact?

A *site* is the paired activations of both models at one hook on the same tokens, and the metric
of any activations put there (the downstream model run from that hook). For a basis (anything
with ``encode`` / ``decode``: a dictionary, principal directions, neurons, a random rotation),
each component's change between the models is ``delta_j = c_j(target) - c_j(start)`` (for a
dictionary trained on differences, its code of the difference), written
into activation space along ``decode(e_j) - decode(0)``. Patching a set S of components moves
``start`` by the sum of their changes, keeping everything else, the basis's error term
included. Necessity starts from the RLHF activations and moves towards the base's (the share of
the layer's gain removed); sufficiency starts from the base and moves towards the RLHF's (the
share reproduced). Both are relative to patching the whole site.

Components are ranked by the size of their attribution (the metric's gradient at ``start`` times
each component's change, summed over positions), the top ``recheck`` re-ranked by the size of
their real single patches (attribution can mis-rank), then the top k patched for real at each k.
A patch that moves the metric past the whole site's effect is no more faithful than one that
falls as far short (``faithfulness``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from irmlens.bases.linear import codes

KS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class Site:
    """Paired activations ``[rows, positions, d]`` at one site and the per-row metric of
    activations put there (differentiable: attribution takes its gradient)."""

    base: torch.Tensor
    rlhf: torch.Tensor
    metric: Callable[[torch.Tensor], torch.Tensor]
    _ends: dict = field(default_factory=dict, repr=False)
    _gradients: dict = field(default_factory=dict, repr=False)
    _changes: dict = field(default_factory=dict, repr=False)  # id -> (basis kept alive, changes)

    def changes(self, basis) -> torch.Tensor:
        """``component_changes`` of ``basis`` between the site's activations, computed once per
        basis (its curves both ways, the sets placed on them and the decomposition read it)."""
        if id(basis) not in self._changes:
            self._changes[id(basis)] = (basis, component_changes(basis, self.base, self.rlhf))
        return self._changes[id(basis)][1]

    def end(self, which: str) -> torch.Tensor:
        """The metric of the site's own ``base`` or ``rlhf`` activations, computed once (every
        basis's curve starts and ends there)."""
        if which not in self._ends:
            with torch.no_grad():
                self._ends[which] = self.metric(getattr(self, which).float())
        return self._ends[which]

    def gradient(self, which: str) -> torch.Tensor:
        """The metric's gradient (mean over rows) at the site's own ``base`` or ``rlhf``
        activations, computed once: every basis's attribution in one direction starts from the
        same activations, so one backward pass serves them all."""
        if which not in self._gradients:
            x = getattr(self, which).detach().clone().float().requires_grad_(True)
            with torch.enable_grad():
                self.metric(x).mean().backward()
            self._gradients[which] = x.grad.detach()
        return self._gradients[which]


def component_directions(basis, d_model: int) -> torch.Tensor:
    """``[n, d]``: each component's unit change written into activation space,
    ``decode(e_j) - decode(0)`` (for an SAE with normalisation or whitening folded into its
    decoder, this is its direction in the model's own space)."""
    n = int(basis.cfg.d_sae)
    with torch.no_grad():
        eye = torch.eye(n, dtype=basis.W_dec.dtype, device=basis.W_dec.device)
        zero = torch.zeros(1, n, dtype=basis.W_dec.dtype, device=basis.W_dec.device)
        return (basis.decode(eye) - basis.decode(zero)).float().cpu().reshape(n, d_model)


def faithfulness(share: float) -> float:
    """How close a patch comes to the whole site's effect, overshooting counted like falling
    short: ``1 - |1 - share|``, floored at 0 (a share of 1.4 is as unfaithful as one of 0.6)."""
    return max(0.0, 1.0 - abs(1.0 - share))


def component_changes(basis, base: torch.Tensor, rlhf: torch.Tensor) -> torch.Tensor:
    """``[..., n]``: each component's change from ``base`` to ``rlhf`` activations: the
    difference of its codes, or what a basis of changes reads (``changes``: a dictionary trained
    on differences, a crosscoder's joint code)."""
    if hasattr(basis, "changes"):
        return basis.changes(base, rlhf)
    return codes(basis, rlhf) - codes(basis, base)


@torch.no_grad()
def faithfulness_curve(
    basis,
    site: Site,
    removed: bool = True,
    ks: Sequence[int] = KS,
    recheck: int = 8,
) -> dict:
    """The basis's curve at the site: for each k (capped at its number of components), the
    share of the site's gain that patching its top k components moves (removes when
    ``removed``, else reproduces); the order the components were ranked in, each ranked
    component's attribution estimate and (for the re-checked) its real single-patch share; the
    area under the curve (the mean ``faithfulness`` over the ks), and the smallest k whose
    faithfulness reaches 0.5 and 0.8.
    ``rows``: per k, the per-row metric (for paired bootstrap CIs between bases)."""
    start = (site.rlhf if removed else site.base).float()
    d = start.shape[-1]
    sign = -1.0 if removed else 1.0  # removing moves from the RLHF values back to the base's
    delta = sign * site.changes(basis)  # [rows, pos, n]
    dirs = component_directions(basis, d)  # [n, d]
    m_start, m_target = (
        site.end("rlhf" if removed else "base"),
        site.end("base" if removed else "rlhf"),
    )
    site_gain = float(m_target.mean() - m_start.mean())

    def moved(features: torch.Tensor) -> torch.Tensor:
        step = torch.einsum("rpn,nd->rpd", delta[..., features], dirs[features])
        return site.metric(start + step)

    def share_of(m: torch.Tensor) -> float:
        return float(m.mean() - m_start.mean()) / site_gain if abs(site_gain) > 1e-12 else 0.0

    grad = site.gradient("rlhf" if removed else "base")  # [rows, pos, d]
    along = torch.einsum("rpd,nd->rpn", grad, dirs)
    attribution = (along * delta).sum((0, 1)) / len(start)  # estimated change of the mean
    estimate = attribution / site_gain if abs(site_gain) > 1e-12 else attribution
    # by the size of their effect, either way: a component that moves the metric back counts as
    # much as one that moves it on (ranking by share alone would pick overshooting sets)
    order = torch.argsort(estimate.abs(), descending=True, stable=True)
    top = order[: min(recheck, len(order))]
    single = {int(j): moved(torch.tensor([int(j)])) for j in top}
    real = {j: share_of(m) for j, m in single.items()}
    head = sorted(real, key=lambda j: -abs(real[j]))
    order = torch.tensor(head + [int(j) for j in order[len(top) :]], dtype=torch.long)
    n = len(order)
    curve, rows = [], {}
    for k in sorted({min(k, n) for k in ks}):
        # k = 1 after a re-check is the re-checked top component's own patch: not run twice
        m = single[head[0]] if k == 1 and head else moved(order[:k])
        curve.append({"k": k, "share": share_of(m)})
        rows[k] = m
    for c in curve:
        c["faithfulness"] = faithfulness(c["share"])
    return {
        "direction": "removed" if removed else "reproduced",
        "n_components": n,
        "site_gain": site_gain,
        "curve": curve,
        "area": sum(c["faithfulness"] for c in curve) / len(curve),
        "k_at_50": next((c["k"] for c in curve if c["faithfulness"] >= 0.5), None),
        "k_at_80": next((c["k"] for c in curve if c["faithfulness"] >= 0.8), None),
        "ranked": [
            {"component": int(j), "estimate": float(estimate[j]), "share": real.get(int(j))}
            for j in order[: max(ks)].tolist()
        ],
        "rows": rows,
        "start_rows": m_start,
    }


def share_at(curve: dict, k: int) -> float:
    """A curve's share at ``k`` (its last point when the basis has fewer than k components)."""
    by_k = {c["k"]: c["share"] for c in curve["curve"]}
    return by_k.get(k, by_k[max(by_k)])


def _boot_faithfulness(curve: dict, site: Site, idx: torch.Tensor) -> torch.Tensor:
    """``[n_boot, n_k]``: the curve's faithfulness at each of its ks on each bootstrap draw of
    rows (``idx`` [n_boot, rows]), the site's ends resampled with them."""
    removed = curve["direction"] == "removed"
    start = curve["start_rows"].double()
    target = site.end("base" if removed else "rlhf").double()
    ks = [c["k"] for c in curve["curve"]]
    rows = torch.stack([curve["rows"][k].double() for k in ks])  # [n_k, rows]
    m_start, m_target = start[idx].mean(1), target[idx].mean(1)
    gain = (m_target - m_start)[:, None]
    shares = (rows[:, idx].mean(-1).T - m_start[:, None]) / torch.where(
        gain.abs() > 1e-12, gain, torch.ones_like(gain)
    )
    return (1.0 - (1.0 - shares).abs()).clamp_min(0.0)


def paired_difference(
    a: dict, b: dict, site: Site, k: int | None = None, n_boot: int = 1000, seed: int = 0
) -> dict:
    """Curve ``a``'s faithfulness minus curve ``b``'s at ``k`` (None: on the area under the
    curves), with its 95% paired bootstrap CI: the same rows resampled for both, so what the
    rows share cancels. Both curves from ``faithfulness_curve`` at the same ``site`` and
    direction, with their ``rows`` kept."""
    gen = torch.Generator().manual_seed(seed)
    n = len(a["start_rows"])
    idx = torch.randint(0, n, (n_boot, n), generator=gen)
    fa, fb = _boot_faithfulness(a, site, idx), _boot_faithfulness(b, site, idx)

    def at(curve: dict, f: torch.Tensor) -> torch.Tensor:
        if k is None:
            return f.mean(1)
        ks = [c["k"] for c in curve["curve"]]
        return f[:, ks.index(min(k, max(ks)))]

    boots = at(a, fa) - at(b, fb)
    point = (
        a["area"] - b["area"]
        if k is None
        else faithfulness(share_at(a, k)) - faithfulness(share_at(b, k))
    )
    lo, hi = torch.quantile(boots, torch.tensor([0.025, 0.975], dtype=boots.dtype)).tolist()
    return {"difference": point, "ci": [lo, hi], "at": "area" if k is None else f"k = {k}"}


@torch.no_grad()
def set_share(basis, site: Site, features: Sequence[int], removed: bool = True) -> float:
    """The share of the site's gain that patching exactly ``features`` of ``basis`` moves (e.g.
    the sparse IRM's features, placed on a curve's axes)."""
    start = (site.rlhf if removed else site.base).float()
    idx = torch.tensor(list(features), dtype=torch.long)
    delta = (-1.0 if removed else 1.0) * site.changes(basis)[..., idx]
    dirs = component_directions(basis, start.shape[-1])[idx]
    m_start = site.end("rlhf" if removed else "base").mean()
    m_target = site.end("base" if removed else "rlhf").mean()
    gain = float(m_target - m_start)
    moved = site.metric(start + torch.einsum("rpn,nd->rpd", delta, dirs)).mean()
    return float(moved - m_start) / gain if abs(gain) > 1e-12 else 0.0


def model_site(
    model,
    tokens: torch.Tensor,
    metric: Callable[[torch.Tensor], torch.Tensor],
    hook: str,
    base_acts,
    rlhf_acts,
) -> Site:
    """A site of a TransformerLens model: activations put at ``hook`` and the model run on from
    there to ``metric`` of its logits (per row; ``irmlens.mediate.metrics``); a block's output
    runs on from the next block (``sweep.patched_metrics``)."""
    from irmlens.mediate.sweep import patched_metrics

    def at_site(acts: torch.Tensor) -> torch.Tensor:
        return patched_metrics(model, tokens, lambda logits: {"m": metric(logits)}, hook, acts)["m"]

    return Site(base_acts, rlhf_acts, at_site)

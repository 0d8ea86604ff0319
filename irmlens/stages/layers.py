"""Stage ``layers``: rank the layers and study the top ``layers.top_k`` (``diff/layers.json``).

Two rankings (``layers.select``, registered in ``SELECTIONS``): the paper's per-layer weight-delta
norm (``weight_delta``: the layers RLHF changed most), or the share of the reward gain each
layer's output carries (``mediation``: the base's residual stream patched into the RLHF model
after the block, on held-out rows, removes that share; ``irmlens.mediate.sweep``). The weight
change is recorded either way. The default is the paper's: it reproduces the paper, costs no
forward pass, and the mediate stage states (and warns about) the share the studied layers carry.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from irmlens.errors import ConfigError
from irmlens.io import atomic_write_json
from irmlens.stages.context import StudyContext, log


def _by_weight_delta(ctx: StudyContext, divs) -> tuple[list[int], dict]:
    key = (lambda d: d.relative_divergence) if ctx.cfg.layers.relative else (lambda d: d.divergence)
    return [d.layer for d in sorted(divs, key=key, reverse=True)], {}


def _by_mediation(ctx: StudyContext, divs) -> tuple[list[int], dict]:  # noqa: ARG001
    """Layers ranked by the share of the gain in expected next-token utility their output
    carries, on ``mediate.n_rows`` held-out rows (ties: the earlier layer)."""
    from irmlens.cache.tokens import tokenize_rows
    from irmlens.mediate.metrics import RewardMetrics, token_utility
    from irmlens.mediate.sweep import layer_sweep

    cfg, models = ctx.cfg, ctx.pair.get()
    base, rlhf = models["base"], models["rlhf"]
    texts = [r.text for r in ctx.splits.heldout]
    rows = tokenize_rows(ctx.pair.tokenizer, texts, cfg.cache.n_ctx, cfg.mediate.n_rows)
    utility = token_utility(ctx.pair.tokenizer, ctx.rm.word_utility, rlhf.cfg.d_vocab)
    metrics = RewardMetrics(rows.tokens, rows.valid, utility)
    sites = [f"blocks.{i}.hook_resid_post" for i in range(rlhf.cfg.n_layers)]
    sweep = layer_sweep(
        base, rlhf, rows.tokens, metrics, sites, cfg.mediate.n_bootstrap, cfg.mediate.seed
    )["expected_utility"]
    share = {int(r["site"].split(".")[1]): r["removed"] for r in sweep["sites"]}
    ranking = sorted(share, key=lambda la: (-share[la], la))
    return ranking, {"mediation_sweep": sweep}


# layers.select -> (ranking, extra record) of the model's layers, most worth studying first
SELECTIONS: dict[str, Callable] = {
    "weight_delta": _by_weight_delta,
    "mediation": _by_mediation,
}


def run(ctx: StudyContext) -> None:
    from irmlens.diff.layers import layer_divergence

    cfg = ctx.cfg
    hooked = ctx.pair.get()
    divs = layer_divergence(
        dict(hooked["base"].named_parameters()), dict(hooked["rlhf"].named_parameters())
    )
    if cfg.layers.top_k > len(divs):
        raise ConfigError(
            f"layers.top_k = {cfg.layers.top_k}, but the model has {len(divs)} layers: lower it"
        )
    ranking, extra = SELECTIONS[cfg.layers.select](ctx, divs)
    studied = sorted(ranking[: cfg.layers.top_k])
    src = cfg.sae.source_info
    if src is not None and src.layer not in studied:
        # the given dictionary's layer is studied (it is the IRM's): it takes the place of the
        # least ranked of the selected layers
        dropped = max(studied, key=ranking.index)
        studied = sorted([la for la in studied if la != dropped] + [src.layer])
        log(f"layers: sae.source reads layer {src.layer}: studied instead of layer {dropped}")
    result = {
        "layers": [d.to_dict() for d in divs],
        "studied_layers": studied,
        "ranking": ranking,
        "select": cfg.layers.select,
    } | extra
    atomic_write_json(ctx.paths.diff / "layers.json", result)
    ctx.__dict__.pop("layers", None)
    log(f"layers: {cfg.layers.select} ranking {ranking}; studying {studied}")


def outputs(paths) -> list[Path]:
    return [paths.diff / "layers.json"]

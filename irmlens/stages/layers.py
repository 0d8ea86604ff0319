"""Stage ``layers``: the paper's per-layer weight-delta norm ranks the layers RLHF changed; the
top ``layers.top_k`` are studied (``diff/layers.json``)."""

from __future__ import annotations

from pathlib import Path

from irmlens.errors import ConfigError
from irmlens.io import atomic_write_json
from irmlens.stages.context import StudyContext, log


def run(ctx: StudyContext) -> None:
    from irmlens.diff.layers import layer_divergence, select_layers

    cfg = ctx.cfg
    hooked = ctx.pair.get()
    divs = layer_divergence(
        dict(hooked["base"].named_parameters()), dict(hooked["rlhf"].named_parameters())
    )
    if cfg.layers.top_k > len(divs):
        raise ConfigError(
            f"layers.top_k = {cfg.layers.top_k}, but the model has {len(divs)} layers: lower it"
        )
    studied = select_layers(divs, cfg.layers.top_k, cfg.layers.relative)
    key = (lambda d: d.relative_divergence) if cfg.layers.relative else (lambda d: d.divergence)
    ranking = [d.layer for d in sorted(divs, key=key, reverse=True)]
    src = cfg.sae.source_info
    if src is not None and src.layer not in studied:
        # the given dictionary's layer is studied (it is the IRM's): it takes the place of the
        # least changed of the selected layers
        dropped = max(studied, key=ranking.index)
        studied = sorted([la for la in studied if la != dropped] + [src.layer])
        log(f"layers: sae.source reads layer {src.layer}: studied instead of layer {dropped}")
    result = {"layers": [d.to_dict() for d in divs], "studied_layers": studied, "ranking": ranking}
    atomic_write_json(ctx.paths.diff / "layers.json", result)
    ctx.__dict__.pop("layers", None)
    log(f"layers: divergence ranking {ranking}; studying {studied}")


def outputs(paths) -> list[Path]:
    return [paths.diff / "layers.json"]

"""Stage ``null``: the null model, fine-tuned exactly like the RLHF model but against a reward
with no relation to the lexicon (``null.reward``: shuffled utilities, or zero); skipped when the
config gives ``model.null`` or a whole pair (``model.rlhf``), or sets ``null.reward = "none"``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from irmlens.stages import rlhf
from irmlens.stages.context import StudyContext


def run(ctx: StudyContext) -> None:
    null_cfg = replace(ctx.cfg.rlhf, reward=ctx.cfg.null.reward)
    rlhf.train(ctx, null_cfg, ctx.paths.null_model, ctx.paths.null_rlhf, "null")


def outputs(paths) -> list[Path]:
    return [paths.null_model, paths.null_rlhf]


def wanted(cfg) -> bool:
    """Whether this study trains a null model."""
    return not cfg.model.null and not cfg.model.rlhf and cfg.null.reward != "none"


def done(ctx: StudyContext) -> bool:
    if not wanted(ctx.cfg):
        return True
    return rlhf.trained(ctx.paths.null_model, ctx.paths.null_rlhf)

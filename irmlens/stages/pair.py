"""Stage ``pair``: the study's model folders (base, rlhf, null), checked as a pair (tokenizer,
weights) and recorded in ``models/dirs.json``, which every later stage reads."""

from __future__ import annotations

from pathlib import Path

from irmlens.run import write_model_dirs
from irmlens.stages import null
from irmlens.stages.context import StudyContext


def run(ctx: StudyContext) -> None:
    from irmlens.models.pair import check_pair_folders

    paths = ctx.paths
    dirs = {"base": ctx.base_dir, "rlhf": ctx.given.get("rlhf", paths.rlhf_model)}
    if "null" in ctx.given:
        dirs["null"] = ctx.given["null"]
    elif null.wanted(ctx.cfg):
        dirs["null"] = paths.null_model
    trained = {
        k: d for k, d in dirs.items() if k not in ctx.given
    }  # the models stage checked the rest
    if len(trained) > 1:
        check_pair_folders(trained, ctx.cfg.model.trust_remote_code)
    write_model_dirs(paths.root, dirs)
    ctx.__dict__.pop("dirs", None)  # read back from the file just written


def identity(ctx: StudyContext) -> dict:
    """What the stages reading the pair remember of it: each model's weights
    (``records.weights_identity``), not where its folder is."""
    from irmlens.records import weights_identity

    return {name: weights_identity(d) for name, d in sorted(ctx.dirs.items())}


def outputs(paths) -> list[Path]:
    return [paths.model_dirs]


def done(ctx: StudyContext) -> bool:
    return False  # cheap, and the models it records may have been re-resolved

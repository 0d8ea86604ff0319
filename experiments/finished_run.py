"""What the IRM experiments read from a finished study run (shared by the scripts beside it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class FinishedRun:
    cfg: object  # StudyConfig
    paths: object  # irmlens.run.RunPaths
    layers: list[int]  # the studied layers, ascending
    targets: object  # irmlens.irm.fit.PositionTargets of the cached text
    split: object  # the run's own fit / held-out word split (irm.seed)


def load_finished_run(run_dir: Path) -> FinishedRun:
    """The run's config, studied layers, word targets (true utilities) and word split."""
    from irmlens.cache.store import load_token_rows
    from irmlens.config import load_config
    from irmlens.irm.fit import position_targets, split_words
    from irmlens.run import RunPaths
    from irmlens.stages.context import StudyContext

    paths = RunPaths(run_dir)
    cfg = load_config(paths.config)
    ctx = StudyContext(cfg, paths)
    rm = ctx.rm
    layers = sorted(ctx.studied_layers)
    rows = load_token_rows(paths.cache)
    targets = position_targets(rows.word_id[rows.valid], rows.words, rm.word_utility)
    return FinishedRun(cfg, paths, layers, targets, split_words(targets, cfg.irm))

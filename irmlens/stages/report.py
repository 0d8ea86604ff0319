"""Stage ``report``: the self-contained HTML report, report.json, summary.md and the CSV exports
(``irmlens.report``). Always rebuilt: it is cheap and reads every earlier stage."""

from __future__ import annotations

from pathlib import Path

from irmlens.stages.context import StudyContext


def run(ctx: StudyContext) -> None:
    from irmlens.report.build import build_report

    build_report(ctx.paths.root, ctx.cfg, ctx.dirs)


def outputs(paths) -> list[Path]:
    return [paths.report]


def done(ctx: StudyContext) -> bool:
    return False


def result(paths) -> Path:
    return paths.report / "index.html"

"""Run a whole study from a config: the ordered list of stages, and the driver that runs them.

A run is a folder. Each stage (one module in ``irmlens/stages/``) reads only files written by
earlier stages, is skipped when its outputs are complete, and writes through temp files + rename,
so a killed run resumes cleanly. Adding a stage is one module and one line in ``STAGES``.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from irmlens.config import StudyConfig
from irmlens.errors import ConfigError
from irmlens.records import (
    RECORDS_DIR,
    damaged_files,
    read_record,
    remove_record,
    stage_timings,
    timing_table,
    verify_stage,
    write_record,
)
from irmlens.run import RunPaths, claim_run_dir, run_lock
from irmlens.stages import (
    cache,
    cards,
    diff,
    irm,
    labels,
    layers,
    models,
    null,
    pair,
    report,
    rlhf,
    saes,
    target,
    validate,
)
from irmlens.stages.context import StudyContext, log


@dataclass(frozen=True)
class Stage:
    """``run(ctx)`` does the work; ``outputs(paths)`` are its files or folders (removed when a
    stage it ``needs`` is forced); ``done(ctx)`` says whether it can be skipped (default: it
    has outputs and all exist); ``result(paths)`` is what ``run_study`` returns when it stops
    here (default: the first output)."""

    name: str
    run: Callable[[StudyContext], None]
    outputs: Callable[[RunPaths], list[Path]]
    needs: tuple[str, ...] = ()
    done: Callable[[StudyContext], bool] | None = None
    result: Callable[[RunPaths], Path] | None = None
    # cheap checks that need the data, the models or the machine, run for every stage before
    # the run folder is claimed, so a config that cannot finish leaves no folder behind
    check: Callable[[StudyContext], None] | None = None
    # the files its completion record lists (default: its outputs; see irmlens.records)
    recorded: Callable[[RunPaths], list[Path]] | None = None

    def is_done(self, ctx: StudyContext) -> bool:
        if self.done is not None:
            return self.done(ctx)
        outs = self.outputs(ctx.paths)
        return bool(outs) and all(p.exists() for p in outs)

    def recorded_targets(self, paths: RunPaths) -> list[Path]:
        targets = (self.recorded or self.outputs)(paths)
        return [t for t in targets if t.exists()]

    def state(self, ctx: StudyContext) -> tuple[str, list[str]]:
        """("done" | "todo" | "unrecorded" | "damaged", damage). Done: its own rule says so and
        its completion record matches its files. Unrecorded: finished by its own rule but with no
        record (killed between its last rename and its record, or a run made before records).
        Damage lists the files that no longer match."""
        if not self.is_done(ctx):
            return "todo", []
        if not self.recorded_targets(ctx.paths):
            return "done", []  # nothing of its own to record (a given model, no null pair)
        rec = read_record(ctx.paths.root, self.name)
        if rec is None:
            return "unrecorded", []
        damage = damaged_files(ctx.paths.root, rec)
        return ("damaged" if damage else "done"), damage


STAGES: tuple[Stage, ...] = (
    Stage("models", models.run, models.outputs, check=models.check),
    Stage("rlhf", rlhf.run, rlhf.outputs, ("models",), rlhf.done),
    Stage("null", null.run, null.outputs, ("models",), null.done),
    Stage("pair", pair.run, pair.outputs, ("rlhf", "null"), pair.done),
    Stage("layers", layers.run, layers.outputs, ("pair",)),
    Stage("cache", cache.run, cache.outputs, ("layers",), cache.done, recorded=cache.recorded),
    Stage(
        "saes", saes.run, saes.outputs, ("cache",), result=lambda p: p.saes, recorded=saes.recorded
    ),
    Stage("diff", diff.run, diff.outputs, ("saes",), result=lambda p: p.diff),
    Stage("target", target.run, target.outputs, ("cache",)),
    Stage("irm", irm.run, irm.outputs, ("saes", "diff", "target"), irm.done),
    Stage("validate", validate.run, validate.outputs, ("diff", "irm"), validate.done),
    Stage("labels", labels.run, labels.outputs, ("irm",), labels.done),
    Stage("cards", cards.run, cards.outputs, ("validate", "labels")),
    Stage("report", report.run, report.outputs, ("cards",), report.done, report.result),
)


def dependents(stage: str) -> list[Stage]:
    """The stages that need ``stage``, directly or through others, in run order."""
    found: set[str] = {stage}
    out = []
    for s in STAGES:
        if set(s.needs) & found:
            found.add(s.name)
            out.append(s)
    return out


def invalidate(paths: RunPaths, stage: str) -> None:
    """Remove the outputs of every stage that needs ``stage``, so they are rebuilt from its new
    results instead of describing the old ones. Each goes in one rename, then is deleted."""
    for s in dependents(stage):
        for own in _own_files(s, paths):
            if _remove(own):
                log(f"{s.name}: {own.name} removed (it derived from the previous {stage})")
        remove_record(paths.root, s.name)


def _own_files(stage: Stage, paths: RunPaths) -> list[Path]:
    """Its outputs and the files its record lists (for saes: every dictionary, not only
    ``mmcs.json``), so that a redo cannot reuse any of them."""
    return list(dict.fromkeys([*stage.outputs(paths), *(stage.recorded or stage.outputs)(paths)]))


def _remove(target: Path) -> bool:
    """Remove a file or folder (a folder in one rename first, so no half of it is left)."""
    if not target.exists():
        return False
    if target.is_dir():
        gone = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.stale."))
        target.replace(gone / target.name)
        shutil.rmtree(gone)
    else:
        target.unlink()
    return True


def verify_finished(paths: RunPaths, upto: str = "cards") -> None:
    """Check every stage up to ``upto`` of a run about to be read: each that wrote anything has
    a completion record and its files match it; else ``DamagedFileError`` names the damaged
    files and the command that redoes them."""
    if not (paths.root / RECORDS_DIR).exists():
        return  # made before completion records: nothing to verify against (`irmlens run` adds them)
    verify_stage(paths.root, "config", required=False)
    for stage in STAGES:
        if stage.recorded_targets(paths) or read_record(paths.root, stage.name) is not None:
            verify_stage(paths.root, stage.name)
        if stage.name == upto:
            return


def _stage_action(ctx: StudyContext, stage: Stage) -> tuple[str, list[str]]:
    """What ``_run_stage`` does with ``stage``: ("skip" | "record" | "redo" | "run", damage).
    Skip: done. Record: finished by an irmlens without completion records. Redo: damaged, or
    finished without its record (its files may be newer than what later stages read). Run: not
    done, or forced."""
    if ctx.forced(stage.name):
        return "run", []
    status, damage = stage.state(ctx)
    if status == "done":
        return "skip", []
    if status == "unrecorded" and ctx.legacy_run:
        return "record", []
    if status in ("damaged", "unrecorded"):
        return "redo", damage
    return "run", []


def _run_stage(ctx: StudyContext, stage: Stage) -> None:
    """Skip a stage that is done; otherwise run it and write its completion record. A forced
    stage keeps its previous outputs until the new ones replace them; a damaged one is redone
    from scratch. Either way the stages that need it are invalidated first (only now: the stages
    before it all succeeded)."""
    paths = ctx.paths
    action, damage = _stage_action(ctx, stage)
    if action == "skip":
        log(f"{stage.name}: done, skipping")
        return
    if action == "record":
        log(f"{stage.name}: done by an irmlens without completion records; recording it")
        write_record(paths.root, stage.name, stage.recorded_targets(paths))
        return
    if damage:
        log(f"{stage.name}: damaged ({'; '.join(damage)}); redoing it and the stages after it")
        for target in _own_files(stage, paths):
            _remove(target)
        remove_record(paths.root, stage.name)
    if action == "redo" or ctx.forced(stage.name):
        invalidate(paths, stage.name)
    started = time.perf_counter()
    stage.run(ctx)
    seconds = time.perf_counter() - started
    write_record(paths.root, stage.name, stage.recorded_targets(paths), seconds)


def run_study(
    cfg: StudyConfig,
    out_dir: str | Path,
    stop_after: str = "report",
    force: tuple[str, ...] = (),
) -> Path:
    """Run (or resume) the stages up to ``stop_after``; return its result (the HTML report for a
    whole study). ``force``: stages to recompute although their outputs exist. The stages that
    need one are invalidated just before it runs; its own previous outputs stay in place until
    its new ones replace them. The run folder is locked for the whole call (``run_lock``)."""
    names = [s.name for s in STAGES]
    if stop_after not in names:
        raise ConfigError(f"unknown stage {stop_after!r}; choose one of {names}")
    unknown = sorted(set(force) - set(names))
    if unknown:
        raise ConfigError(f"cannot force {unknown}: no such stage; stages: {names}")
    paths = RunPaths(Path(out_dir))
    if paths.root.exists() and not paths.root.is_dir():
        raise ConfigError(f"--out {paths.root} is a file, not a folder: name a run folder")
    ctx = StudyContext(cfg, paths, frozenset(force))
    for stage in STAGES:
        if stage.check is not None:
            stage.check(ctx)
    with run_lock(paths.root):
        torch.manual_seed(cfg.seed)
        # a finished run from before completion records: its stages are recorded, not redone
        ctx.legacy_run = paths.config.exists() and not (paths.root / RECORDS_DIR).exists()
        claim_run_dir(paths, cfg)
        t0 = time.time()
        for stage in STAGES:
            _run_stage(ctx, stage)
            if stage.name == stop_after:
                break
        if stop_after == "report":
            log(f"done in {time.time() - t0:.0f}s; each stage's last completed run:")
            log(timing_table(stage_timings(paths.root, names)))
        if stage.result is not None:
            return stage.result(paths)
        outs = stage.outputs(paths)
        return outs[0] if outs else paths.root


# what torchrun sets that makes a library believe it is one of several processes
TORCHRUN_VARIABLES = (
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "ROLE_NAME",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
)


@contextmanager
def _one_process_view():
    """Hide torchrun's variables while rank 0 runs the stages before the cache alone, so trl's
    accelerate and the SAE trainers see one process (they would otherwise wait for ranks that
    are not running them)."""
    import os

    saved = {n: os.environ.pop(n) for n in TORCHRUN_VARIABLES if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def run_cache_data_parallel(cfg: StudyConfig, out_dir: str | Path) -> Path:
    """``run_study(cfg, out_dir, stop_after="cache")`` under ``torchrun``: rank 0 runs the
    stages before the cache alone; then the process group starts (gloo, or nccl with one GPU per
    process on CUDA) and every rank runs the cache stage on its slice of the token batches
    (``build_paired_cache``: rank r writes shards r, r + N, ...; rank 0 merges the progress files
    and writes the one manifest), and rank 0 writes its completion record. Returns the cache
    folder. The shards, statistics and manifest are those one process writes (tests)."""
    import os
    from datetime import timedelta

    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    names = [s.name for s in STAGES]
    stage = STAGES[names.index("cache")]
    paths = RunPaths(Path(out_dir))
    if rank == 0:
        with _one_process_view():
            run_study(cfg, out_dir, stop_after=names[names.index("cache") - 1])
    cuda = cfg.model.device.startswith("cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # the other ranks wait here while rank 0 runs the stages before the cache (RLHF: hours on a
    # large model), hence the long timeout
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=24))
    try:
        go = [False]
        if rank == 0:
            ctx = StudyContext(cfg, paths, frozenset())
            ctx.legacy_run = paths.config.exists() and not (paths.root / RECORDS_DIR).exists()
            go = [_stage_action(ctx, stage)[0] in ("run", "redo")]
        dist.broadcast_object_list(go, src=0)
        result = paths.cache
        if rank == 0:  # the cache stage joins the other ranks' collectives inside
            result = run_study(cfg, out_dir, stop_after="cache")
        elif go[0]:
            # safe to start at once: build_paired_cache's first collective is a barrier after
            # rank 0 has written the tokens, i.e. after its _run_stage removed a damaged cache
            stage.run(StudyContext(cfg, paths, frozenset()))
        dist.barrier()
        return result
    finally:
        dist.destroy_process_group()

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
from irmlens.errors import ConfigError, DamagedFileError, ForeignFilesError
from irmlens.records import (
    damaged_files,
    read_record,
    record_digest,
    remove_record,
    stage_timings,
    stale_inputs,
    timing_table,
    verify_stage,
    write_record,
)
from irmlens.run import (
    LOCK_FILENAME,
    RunPaths,
    check_out_folder,
    check_records_exist,
    claim_run_dir,
    run_lock,
)
from irmlens.stages import (
    cache,
    cards,
    diff,
    irm,
    labels,
    layers,
    mediate,
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
    # files in its folders that it wrote besides those its record lists (the cache's shards,
    # listed with their sha256 in its manifest): anything else there is the user's, never removed
    owned: Callable[[RunPaths], set[Path]] | None = None
    # writes nothing into the run folder, so it runs before the folder is claimed (the models
    # stage's pair checks: a refused pair leaves no claim behind)
    before_claim: bool = False
    # what its record stands for besides its files (``records.weights_identity`` of models
    # outside the run), in the digest its dependents remember; and whether its files count there
    # (``models/dirs.json`` names folders: where they are must not matter, what they hold must)
    identity: Callable[[StudyContext], dict] | None = None
    digest_files: bool = True
    # what it needs from outside the run (a model from PyPI or the hub), by the config alone:
    # fetched before the folder is claimed and before any output is removed, so a run never
    # downloads mid-way nor loses a finished stage's files to a fetch that fails
    # (``irmlens data fetch CONFIG`` calls every stage's)
    fetch: Callable[[StudyConfig], None] | None = None

    def is_done(self, ctx: StudyContext) -> bool:
        if self.done is not None:
            return self.done(ctx)
        outs = self.outputs(ctx.paths)
        return bool(outs) and all(p.exists() for p in outs)

    def recorded_targets(self, paths: RunPaths) -> list[Path]:
        targets = (self.recorded or self.outputs)(paths)
        return [t for t in targets if t.exists()]

    def state(self, ctx: StudyContext) -> tuple[str, list[str]]:
        """("done" | "todo" | "unrecorded" | "damaged" | "stale", details). Done: its own rule
        says so, its completion record matches its files, and the stages it read are those its
        record remembers. Unrecorded: finished by its own rule but with no record (killed between
        its last rename and its record). Damaged: details name the files that no longer match
        (or that its own rule could not read). Stale: details name the stages it read that were
        redone since (their results are not the ones it was computed from)."""
        try:
            finished = self.is_done(ctx)
        except DamagedFileError as e:  # its own rule reads a file (the cache's manifest)
            return "damaged", [str(e)]
        if not finished:
            return "todo", []
        if not self.recorded_targets(ctx.paths):
            return "done", []  # nothing of its own to record (a given model, no null pair)
        rec = read_record(ctx.paths.root, self.name)
        if rec is None:
            return "unrecorded", []
        if isinstance(rec.get("redo"), str):  # listed by `irmlens adopt`, not vouched for
            return "damaged", [rec["redo"]]
        damage = damaged_files(ctx.paths.root, rec)
        if damage:
            return "damaged", damage
        stale = stale_inputs(ctx.paths.root, rec)
        return ("stale" if stale else "done"), stale

    def owned_files(self, paths: RunPaths) -> set[Path]:
        """Every file this stage wrote that is still in its folders: those its record lists, and
        those it keeps apart (``owned``); its scratch (temp files, checkpoints) is ``_is_scratch``."""
        rec = read_record(paths.root, self.name) or {"files": {}}
        known = {paths.root / rel for rel in rec["files"]}
        if self.owned is not None:
            known |= self.owned(paths)
        return known

    def foreign_files(self, paths: RunPaths, unrecorded: bool = False) -> list[Path]:
        """Files in this stage's folders that it did not write (a user's notes, hidden or not):
        redoing the stage replaces or removes those folders whole, so it must not run while they
        are there. A stage with no record that never finished has only its own partial work there
        (a killed cache's shards); one that finished without its record (``unrecorded``) cannot
        tell its files from anyone's, so every file there counts."""
        if read_record(paths.root, self.name) is None and not unrecorded:
            return []
        known = self.owned_files(paths)
        folders = [t for t in _own_files(self, paths) if t.is_dir() and not t.is_symlink()]
        return [f for f in _files_under(folders) if f not in known]


STAGES: tuple[Stage, ...] = (
    Stage(
        "models",
        models.run,
        models.outputs,
        check=models.check,
        before_claim=True,
        identity=models.identity,
        fetch=models.fetch,
    ),
    Stage("rlhf", rlhf.run, rlhf.outputs, ("models",), rlhf.done),
    Stage("null", null.run, null.outputs, ("models",), null.done),
    Stage(
        "pair",
        pair.run,
        pair.outputs,
        ("rlhf", "null"),
        pair.done,
        identity=pair.identity,
        digest_files=False,
    ),
    Stage("layers", layers.run, layers.outputs, ("pair",)),
    Stage(
        "cache",
        cache.run,
        cache.outputs,
        ("layers",),
        cache.done,
        recorded=cache.recorded,
        owned=cache.owned,
    ),
    Stage(
        "saes", saes.run, saes.outputs, ("cache",), result=lambda p: p.saes, recorded=saes.recorded
    ),
    Stage("diff", diff.run, diff.outputs, ("saes",), result=lambda p: p.diff),
    Stage("target", target.run, target.outputs, ("cache",)),
    Stage("irm", irm.run, irm.outputs, ("saes", "diff", "target"), irm.done),
    Stage("mediate", mediate.run, mediate.outputs, ("irm",), mediate.done),
    Stage("validate", validate.run, validate.outputs, ("diff", "irm"), validate.done),
    Stage(
        "labels",
        labels.run,
        labels.outputs,
        ("irm",),
        labels.done,
        check=labels.check,
        fetch=labels.fetch,
    ),
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


def _is_scratch(rel: Path) -> bool:
    """Whether a path inside a stage's folder is irmlens's own scratch: temporary files and
    folders of an atomic write (``.name.*.tmp``, ``.old``, ``.stale.``), checkpoints, locks."""
    return any(
        part.startswith(".")
        and (
            part.endswith((".tmp", ".old", ".checkpoints", LOCK_FILENAME))
            or ".stale." in part
            or part == ".checkpoints"
        )
        for part in rel.parts
    )


def _files_under(folders: list[Path]) -> list[Path]:
    """Every file under ``folders``, hidden ones included, irmlens's scratch left out."""
    out = []
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            if (p.is_file() or p.is_symlink()) and not _is_scratch(p.relative_to(folder)):
                out.append(p)
    return out


def refuse_foreign_files(
    paths: RunPaths, stages: list[Stage], unrecorded: frozenset[str] = frozenset()
) -> None:
    """Raise ``ForeignFilesError`` naming every file in these stages' folders that they did not
    write, before any of those folders is replaced or removed (``unrecorded``: the stages that
    finished without a record, whose every file counts)."""
    per_stage = {s.name: s.foreign_files(paths, s.name in unrecorded) for s in stages}
    found = [f for files in per_stage.values() for f in files]
    if found:
        shown = ", ".join(str(f) for f in found[:8]) + (
            f" and {len(found) - 8} more" if len(found) > 8 else ""
        )
        names = ", ".join(n for n, files in per_stage.items() if files)
        unknown = sorted(set(unrecorded) & {n for n, files in per_stage.items() if files})
        why = (
            f" (stage {', '.join(unknown)} finished without its completion record, so irmlens "
            "cannot tell what it wrote from what you put there: remove the folder yourself once "
            "nothing in it is yours)"
            if unknown
            else ""
        )
        raise ForeignFilesError(
            f"{shown}: not written by irmlens (no completion record lists them), in the folders "
            f"of stage(s) {names}, which this command would replace whole{why}. Move them out of "
            "the run folder, then run the command again; those folders were not changed."
        )


def refuse_links(paths: RunPaths, stages: list[Stage]) -> None:
    """Refuse to run or remove these stages while one of their files or folders is a symbolic
    link: a stage replaces its folders whole and never writes through a link (it would change a
    folder outside the run), and finding that out after the stages that need it were removed
    left a run without a report."""
    seen = []  # the stage's own paths (a link above them, `models/` on another disk, is yours)
    for stage in stages:
        seen += [p for p in _own_files(stage, paths) if p.is_symlink() and p not in seen]
    if seen:
        shown = ", ".join(f"{p} -> {p.readlink()}" for p in seen)
        raise ForeignFilesError(
            f"{shown}: a symbolic link where a stage writes its results. irmlens replaces its "
            "stage folders whole and never writes through a link (it would change what the link "
            "points to, outside the run folder). Replace the link with the folder it points to "
            "(or remove it: the stage is then redone); nothing was changed."
        )


def invalidate(paths: RunPaths, stage: str) -> None:
    """Remove the outputs of every stage that needs ``stage``, so they are rebuilt from its new
    results instead of describing the old ones. Each goes in one rename, then is deleted."""
    refuse_foreign_files(paths, dependents(stage))
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
    a completion record, its files match it, and it was computed from the results of the stages
    before it that are there now; else ``DamagedFileError`` names the damaged files (or the stage
    redone under it) and the command that redoes them. A run without records is refused
    (``UnverifiedRunError``: ``irmlens adopt`` records it)."""
    check_records_exist(paths.root)
    verify_stage(paths.root, "config", required=False)
    for stage in STAGES:
        if stage.recorded_targets(paths) or read_record(paths.root, stage.name) is not None:
            verify_stage(paths.root, stage.name)
        if stage.name == upto:
            return


def stage_named(name: str) -> Stage:
    """The stage of ``STAGES`` called ``name``."""
    return next(s for s in STAGES if s.name == name)


def stage_inputs(paths: RunPaths, stage: Stage) -> dict[str, str | None]:
    """What ``stage``'s record remembers of the stages it needs (``records.record_digest``)."""
    return {n: record_digest(read_record(paths.root, n)) for n in stage.needs}


def record_stage(
    paths: RunPaths,
    name: str,
    seconds: float | None = None,
    ctx: StudyContext | None = None,
    adopted: dict | None = None,
) -> None:
    """Write the completion record of stage ``name``: its files, its inputs' digests and (with
    ``ctx``) its identity; ``adopted``: what ``irmlens adopt`` checked of it."""
    stage = stage_named(name)
    identity = stage.identity(ctx) if stage.identity is not None and ctx is not None else None
    write_record(
        paths.root,
        name,
        stage.recorded_targets(paths),
        seconds,
        stage_inputs(paths, stage),
        adopted=adopted,
        identity=identity,
        digest_files=stage.digest_files,
    )


def _stage_action(ctx: StudyContext, stage: Stage) -> tuple[str, str, list[str]]:
    """What ``_run_stage`` does with ``stage``: ("skip" | "redo" | "run", its state, details).
    Skip: done. Redo: damaged, computed from a stage redone since (stale), or finished without
    its record (its files may be newer than what later stages read). Run: not done, or forced."""
    if ctx.forced(stage.name):
        return "run", "forced", []
    status, details = stage.state(ctx)
    if status == "done":
        return "skip", status, []
    if status in ("damaged", "stale", "unrecorded"):
        return "redo", status, details
    return "run", status, []


def _run_stage(ctx: StudyContext, stage: Stage, record: bool = True) -> float | None:
    """Skip a stage that is done; otherwise run it and write its completion record (``record``
    False: return its seconds for the caller to record later). A forced stage keeps its previous
    outputs until the new ones replace them; a damaged or stale one is redone from scratch.
    Either way the stages that need it are invalidated first (only now: the stages before it all
    succeeded). Files in its folders or theirs that irmlens did not write stop it first."""
    paths = ctx.paths
    action, status, details = _stage_action(ctx, stage)
    if action == "skip":
        log(f"{stage.name}: done, skipping")
        return None
    replaced = action == "redo" or ctx.forced(stage.name)  # then its dependents go too
    touched = [stage, *(dependents(stage.name) if replaced else [])]
    refuse_links(paths, touched)
    unrecorded = frozenset({stage.name} if status == "unrecorded" else ())
    refuse_foreign_files(paths, touched, unrecorded)
    if action == "redo":
        if status == "stale":
            why = f"computed from an earlier {' and '.join(details)}, redone since"
        elif status == "damaged":
            why = f"damaged ({'; '.join(details)})"
        else:
            why = "finished without its completion record"
        log(f"{stage.name}: {why}; redoing it and the stages after it")
        for target in _own_files(stage, paths):
            _remove(target)
        remove_record(paths.root, stage.name)
    if replaced:
        invalidate(paths, stage.name)
    started = time.perf_counter()
    stage.run(ctx)
    seconds = time.perf_counter() - started
    if record:
        record_stage(paths, stage.name, seconds, ctx)
    return seconds


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
    check_out_folder(paths.root)  # a user's folder, or a run without records: refused
    ctx = StudyContext(cfg, paths, frozenset(force))
    for stage in STAGES:
        if stage.check is not None:
            stage.check(ctx)
    _fetch_what_will_run(ctx, stop_after)
    existed = paths.root.exists()
    with run_lock(paths.root):
        torch.manual_seed(cfg.seed)
        t0 = time.time()
        # the stages that write nothing into the folder run before it is claimed, so a pair
        # they refuse leaves no config behind that would refuse the corrected one
        early = [s for s in STAGES if s.before_claim]
        seconds = {}
        # a forced stage replaces its folders and its dependents': refused before any work
        forced = [s for s in STAGES if s.name in force]
        touched = forced + [d for f in forced for d in dependents(f.name)]
        refuse_links(paths, touched)
        refuse_foreign_files(paths, touched)
        try:
            for stage in early:
                seconds[stage.name] = _run_stage(ctx, stage, record=False)
            claim_run_dir(paths, cfg)
        except BaseException:
            if not existed:  # leave no folder behind (the lock file is all it holds)
                _remove_unclaimed(paths)
            raise
        for name, s in seconds.items():
            record_stage(paths, name, s, ctx)
        for stage in STAGES:
            if not stage.before_claim:
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


def _fetch_what_will_run(ctx: StudyContext, stop_after: str) -> None:
    """Fetch the outside inputs of every stage up to ``stop_after`` that will run: not done,
    forced, or after a forced stage (a finished stage's model may be gone: it must not stop a
    resume that does not run it)."""
    redone = {d.name for f in ctx.force for d in dependents(f)} | set(ctx.force)
    for stage in STAGES:
        if stage.fetch is not None and (stage.name in redone or not stage.is_done(ctx)):
            stage.fetch(ctx.cfg)
        if stage.name == stop_after:
            break


def fetch_inputs(cfg: StudyConfig) -> None:
    """Every stage's outside inputs for ``cfg`` (``irmlens data fetch CONFIG``)."""
    for stage in STAGES:
        if stage.fetch is not None:
            stage.fetch(cfg)


def _remove_unclaimed(paths: RunPaths) -> None:
    """Remove a run folder this command created and never claimed (it holds only the lock)."""
    import contextlib

    from irmlens.lock import LOCK_FILENAME

    with contextlib.suppress(OSError):
        (paths.root / LOCK_FILENAME).unlink()
        paths.root.rmdir()  # only if empty: anything else in it stays


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

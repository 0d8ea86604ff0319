"""``irmlens adopt RUN``: give completion records to a run folder that has none.

A run made by an irmlens before completion records, or copied without its dot-folders, has no
``.records/``: nothing says its files are the ones its stages wrote, so every command refuses it
rather than read (or worse, record as good) a file edited since. Adopting is the explicit step
that accepts it. Each finished stage is checked with what the folder itself holds (cache shards
against the manifest's sha256, SAE weights against their ``training.json``, every JSON, JSON-lines
and safetensors file parsed) and recorded as it is now, marked ``adopted`` with what was checked;
the report of an adopted run says so. What cannot be checked is said too: a file edited before
adoption whose format is intact (a number changed in ``irm/metrics.json``) is recorded as it is.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from irmlens.errors import CorruptCacheError, DamagedFileError, IrmlensError
from irmlens.io import read_json, read_jsonl
from irmlens.pipeline import STAGES, record_stage
from irmlens.records import RECORDS_DIR, recorded_files, write_record
from irmlens.run import ADOPTING, RunPaths, read_model_dirs, read_run_config, run_lock
from irmlens.stages.context import StudyContext


@dataclass
class StageCheck:
    """What adopting one stage checked: files matched against checksums irmlens wrote beside
    them, files whose format parsed, and files nothing could check."""

    stage: str
    checksummed: int = 0
    parsed: int = 0
    unchecked: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "by": "irmlens adopt",
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "checksummed": self.checksummed,
            "parsed": self.parsed,
            "unchecked": len(self.unchecked),
        }


def _check_file(path: Path, check: StageCheck) -> None:
    """Parse ``path`` by its kind (a damaged one raises ``DamagedFileError``)."""
    if path.suffix == ".json":
        read_json(path)
    elif path.suffix == ".jsonl":
        read_jsonl(path)
    elif path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                list(f.keys())
        except Exception as e:  # safetensors raises its own error types
            raise DamagedFileError(f"{path} is not a readable safetensors file ({e})") from None
    else:
        check.unchecked.append(str(path))
        return
    check.parsed += 1


def _check_stage(stage, paths: RunPaths) -> StageCheck:
    """Check every file of a finished stage with what the folder holds; raise
    ``DamagedFileError`` or ``CorruptCacheError`` at the first that fails."""
    check = StageCheck(stage.name)
    files = recorded_files(stage.recorded_targets(paths))
    if stage.name == "cache":
        from irmlens.cache.store import cache_is_complete, load_manifest

        if not cache_is_complete(paths.cache, verify=True):
            raise DamagedFileError(
                f"{paths.cache}: a shard its manifest lists is missing or fails its sha256"
            )
        check.checksummed += len(load_manifest(paths.cache)["files"])
    sums = set()
    for folder in {f.parent for f in files if f.name == "training.json"}:
        from sae_training.train import _read_training_record, _verify_sae_files

        _verify_sae_files(folder)  # the weights against the sha256 save_sae wrote
        listed = (_read_training_record(folder) or {}).get("sha256") or {}
        sums |= {folder / n for n in listed}
    for f in files:
        if f in sums:
            check.checksummed += 1
        else:
            _check_file(f, check)
    return check


def _list_for_redo(paths: RunPaths, stages, why: str) -> None:
    """Records for the stages adoption stopped at or before: their files listed (so ``irmlens
    run`` knows them as irmlens's and may replace them) and marked to be redone."""
    for stage in stages:
        targets = stage.recorded_targets(paths)
        if targets:
            write_record(paths.root, stage.name, targets, redo=why)


def adopt_run(run_dir: str | Path, log=print) -> list[StageCheck]:
    """Record the finished stages of a run folder that has no completion records, after checking
    them (``StageCheck``); stop at the first stage that is unfinished or fails its check (it and
    the stages after it are left for ``irmlens run`` to redo). Returns the adopted stages."""
    paths = RunPaths(Path(run_dir))
    records = paths.root / RECORDS_DIR
    cfg = read_run_config(paths)  # readable, and a config this irmlens accepts
    adopted: list[StageCheck] = []
    with run_lock(paths.root):
        if (records / ADOPTING).exists():  # an adoption killed half-way: start it over
            shutil.rmtree(records)
        if records.exists():
            raise IrmlensError(
                f"{paths.root} has completion records already: nothing to adopt (`irmlens run "
                f"{paths.config} --out {paths.root}` verifies and resumes it)"
            )
        records.mkdir()
        (records / ADOPTING).touch()  # every command refuses the folder until it is gone
        config_check = StageCheck("config", parsed=1)
        write_record(paths.root, "config", [paths.config], adopted=config_check.summary())
        ctx = StudyContext(cfg, paths)
        ctx.base_dir = read_model_dirs(paths.root)["base"] if paths.model_dirs.exists() else None
        for stage in STAGES[:-1]:  # the report is rebuilt, never adopted: it says what was
            if stage.before_claim:  # writes nothing here: recorded as every run records it
                if ctx.base_dir is None:
                    log(f"{stage.name}: not adopted: {paths.model_dirs} is missing")
                    _list_for_redo(paths, STAGES[1:-1], f"{paths.model_dirs} is missing")
                    break
                record_stage(paths, stage.name, None, ctx, StageCheck(stage.name).summary())
                continue
            try:
                outs = stage.outputs(paths)
                # a stage redone on every run (pair, report) is finished when its files are there
                finished = stage.is_done(ctx) or (bool(outs) and all(p.exists() for p in outs))
                if finished and not stage.recorded_targets(paths):
                    continue  # nothing of its own (a given model, no null pair): no record
                check = _check_stage(stage, paths) if finished else None
            except (DamagedFileError, CorruptCacheError) as e:
                log(
                    f"{stage.name}: not adopted: {e}; `irmlens run` redoes it and the stages after it"
                )
                _list_for_redo(paths, STAGES[STAGES.index(stage) : -1], f"not adopted: {e}")
                break
            if check is None:
                log(f"{stage.name}: not finished; `irmlens run` does it and the stages after it")
                rest = STAGES[STAGES.index(stage) + 1 : -1]
                _list_for_redo(paths, rest, f"after {stage.name}, which was not finished")
                break
            record_stage(paths, stage.name, None, ctx, check.summary())
            adopted.append(check)
            log(
                f"{stage.name}: adopted ({check.checksummed} files matched checksums irmlens wrote "
                f"beside them, {check.parsed} parsed, {len(check.unchecked)} not checkable)"
            )
        (records / ADOPTING).unlink()
    return adopted

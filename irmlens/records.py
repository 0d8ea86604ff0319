"""Completion records: what each stage of a run wrote, with sha256, written last.

A stage is done only when its record exists and every file it lists still has its size and
sha256, so a file truncated, flipped or replaced after the stage finished is found before anything
reads it, and named with the command that redoes it. Records live in ``RUN/.records/<stage>.json``
(``config.json`` records ``config.toml``). Cache shards are listed in the cache's own manifest with
their checksums and verified by the store when read; the cache stage's record covers the manifest.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from irmlens.errors import DamagedFileError
from irmlens.io import atomic_write_json, sha256_file

RECORDS_DIR = ".records"


def record_path(root: Path, stage: str) -> Path:
    return Path(root) / RECORDS_DIR / f"{stage}.json"


def recorded_files(targets: Iterable[Path]) -> list[Path]:
    """The files under ``targets`` (files or folders), hidden names (temp files, checkpoints)
    left out: they are a stage's scratch, not its result."""
    out = []
    for t in targets:
        if t.is_file():
            out.append(t)
        elif t.is_dir():
            for p in sorted(t.rglob("*")):
                rel = p.relative_to(t)
                if p.is_file() and not any(part.startswith(".") for part in rel.parts):
                    out.append(p)
    return out


def write_record(
    root: Path,
    stage: str,
    targets: Iterable[Path],
    seconds: float | None = None,
    inputs: dict[str, str | None] | None = None,
    adopted: dict | None = None,
    identity: dict | None = None,
    digest_files: bool = True,
    redo: str | None = None,
) -> None:
    """The stage's completion record: each file's size and sha256, the ``record_digest`` of each
    stage it read (``inputs``: a stage redone since then makes this one stale), how long the
    stage ran (``seconds``; what experiments/benchmarks/stage_costs.py reads), and, for files
    recorded by ``irmlens adopt`` rather than written by a stage, what was checked (``adopted``)."""
    root = Path(root)
    files = {
        str(p.relative_to(root)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in recorded_files(targets)
    }
    record = {"stage": stage, "files": files}
    if inputs is not None:
        record["inputs"] = dict(sorted(inputs.items()))
    if identity is not None:  # what it stands for besides its files (a model outside the run)
        record["identity"] = identity
    if not digest_files:  # its files name things (folders) whose identity is what counts
        record["digest_files"] = False
    if redo is not None:  # its files are listed (so they are known as irmlens's) but not trusted
        record["redo"] = redo
    if adopted is not None:
        record["adopted"] = adopted
    if seconds is not None:  # and the machine they were measured on (runs resume elsewhere)
        record["seconds"] = seconds
        record["machine"] = machine_summary()
    atomic_write_json(record_path(root, stage), record)


def record_digest(record: dict | None) -> str | None:
    """What a stage's dependents remember of it: the sha256 of its files and of its own inputs,
    so a change anywhere upstream (an RLHF model retrained) changes every digest below it, even
    through a stage whose own files came out the same (``models/dirs.json`` names folders)."""
    if record is None:
        return None
    import hashlib

    files = record.get("files") if record.get("digest_files", True) else None
    content = {"files": files, "inputs": record.get("inputs")}
    if "identity" in record:
        content["identity"] = record["identity"]
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def weights_identity(folder: Path) -> dict[str, str]:
    """A cheap fingerprint of a model folder outside the run (the base model in the irmlens home,
    a given model): for ``config.json`` and each weight file, its size and the sha256 of three
    1 MiB samples (start, middle, end). Retraining changes every weight, so it changes this; a
    copy of the same model elsewhere (another irmlens home) does not, and nothing is redone."""
    import hashlib

    out = {}
    folder = Path(folder)
    names = ["config.json", *sorted(p.name for p in folder.glob("*.safetensors"))]
    names += sorted(p.name for p in folder.glob("*.bin") if not p.name.startswith("training_args"))
    for name in names:
        f = folder / name
        if not f.is_file():
            continue
        size = f.stat().st_size
        h = hashlib.sha256(str(size).encode())
        with open(f, "rb") as fh:
            for at in sorted({0, max(0, size // 2 - (1 << 19)), max(0, size - (1 << 20))}):
                fh.seek(at)
                h.update(fh.read(1 << 20))
        out[name] = h.hexdigest()
    return out


def stale_inputs(root: Path, record: dict) -> list[str]:
    """The stages this record was computed from that have been redone since (their digest
    differs from the one it recorded). A record without ``inputs`` (written before they were
    kept) is taken as it is."""
    inputs = record.get("inputs")
    if not isinstance(inputs, dict):
        return []
    return [s for s, d in inputs.items() if record_digest(read_record(root, s)) != d]


def adopted_stages(root: Path) -> dict[str, dict]:
    """The stages whose records ``irmlens adopt`` wrote (files recorded as they were found, not
    as a stage wrote them), with what it checked: the report says so."""
    out = {}
    for p in sorted((Path(root) / RECORDS_DIR).glob("*.json")):
        rec = read_record(root, p.stem)
        if rec is not None and isinstance(rec.get("adopted"), dict):
            out[p.stem] = rec["adopted"]
    return out


def remove_record(root: Path, stage: str) -> None:
    record_path(root, stage).unlink(missing_ok=True)


def read_record(root: Path, stage: str) -> dict | None:
    """The stage's record, or None if it has none (never finished, or an unreadable record:
    then the stage is simply not known to be done)."""
    p = record_path(root, stage)
    try:
        rec = json.loads(p.read_text(encoding="utf-8"))
        return rec if isinstance(rec.get("files"), dict) else None
    except (OSError, ValueError, AttributeError):
        return None


def damaged_files(root: Path, record: dict) -> list[str]:
    """What no longer matches ``record``: each entry names the file and how it differs."""
    root = Path(root)
    problems = []
    for rel, want in record["files"].items():
        p = root / rel
        if not isinstance(want, dict):
            problems.append(f"{p}: its record entry is damaged")
        elif not p.is_file():
            problems.append(f"{p} is missing")
        elif p.stat().st_size != want.get("size"):
            problems.append(f"{p} has {p.stat().st_size} bytes, not the {want.get('size')} written")
        elif sha256_file(p) != want.get("sha256"):
            problems.append(f"{p} has changed since it was written (sha256 differs)")
    return problems


def redo_command(root: Path) -> str:
    return f"irmlens run {Path(root) / 'config.toml'} --out {root}"


def verify_stage(root: Path, stage: str, required: bool = True) -> None:
    """Raise ``DamagedFileError`` naming each damaged file of ``stage`` and the command that
    redoes it. ``required``: a missing record is an error too (the stage never finished)."""
    rec = read_record(root, stage)
    if rec is None:
        if required:
            raise DamagedFileError(
                f"{root}: stage {stage!r} has no completion record ({record_path(root, stage)}): "
                f"it never finished, or its record is damaged. Finish or redo it with "
                f"`{redo_command(root)}`"
            )
        return
    problems = damaged_files(root, rec)
    if isinstance(rec.get("redo"), str):
        problems.append(f"stage {stage!r} is to be redone: {rec['redo']}")
    stale = stale_inputs(root, rec)
    if stale:
        problems.append(
            f"stage {stage!r} was computed from an earlier {' and '.join(stale)} (redone since): "
            "its files describe results that are no longer there"
        )
    if problems and stage == "config":  # redoing it with config.toml itself would read it
        raise DamagedFileError(
            "; ".join(problems) + f": the run's config. Restore it: run `irmlens run YOUR_CONFIG "
            f"--out {root}` with the config the run was made with (it is written again)"
        )
    if problems:
        raise DamagedFileError(
            f"stage {stage!r} of {root} is damaged: "
            + "; ".join(problems)
            + f". Redo it (and the stages after it) with `{redo_command(root)}`"
        )


def stage_timings(root: Path, stages: Iterable[str] | None = None) -> list[dict]:
    """Each stage's seconds on its last completed run (``None``: no record, or recorded without
    a time), in ``stages``' order, or (None) every recorded stage in the order its last run
    finished: the per-stage timing table of the log and report.json."""
    if stages is None:
        found = sorted(
            (Path(root) / RECORDS_DIR).glob("*.json"), key=lambda p: p.stat().st_mtime_ns
        )
        stages = [p.stem for p in found]
    out = []
    for name in stages:
        rec = read_record(root, name) or {}
        out.append({"stage": name, "seconds": rec.get("seconds"), "machine": rec.get("machine")})
    return out


def machine_summary() -> dict:
    """What a stage's seconds depend on: CPU model, cores, AVX-512, torch threads, GPU."""
    import os
    import platform

    import torch

    model, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.machine()):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = line
                    break
    except OSError:  # not Linux: the platform's own name
        pass
    return {
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "avx512": "avx512f" in flags.split() if flags else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def timing_table(timings: list[dict]) -> str:
    """The timing table as log lines: stage, seconds, share of the total."""
    total = sum(t["seconds"] or 0.0 for t in timings)
    lines = [f"{'stage':10s} {'seconds':>9s} {'share':>6s}"]
    for t in timings:
        s = t["seconds"]
        share = f"{s / total:6.1%}" if s is not None and total > 0 else "     -"
        lines.append(f"{t['stage']:10s} {'-' if s is None else f'{s:9.1f}':>9s} {share}")
    lines.append(f"{'total':10s} {total:9.1f}")
    return "\n".join(lines)

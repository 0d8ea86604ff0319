"""The run folder: where each stage's files live (``RunPaths``) and who may write them (``run_lock``).

Every command that writes into a run folder holds its lock for as long as it writes, so two
``irmlens run`` (or ``rlhf``, ``irm``, ``report``) on one folder cannot interleave their steps: the
second is refused at once, naming the holder's pid. The lock is an ``flock`` on ``.irmlens.lock``,
which the kernel releases when its process exits however it exits, so a lock left by a killed run
is stale by construction and never blocks the rerun that resumes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from irmlens.errors import RunLockedError

LOCK_FILENAME = ".irmlens.lock"


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def lock(self) -> Path:
        return self.root / LOCK_FILENAME

    @property
    def rlhf_model(self) -> Path:
        return self.root / "models" / "rlhf"

    @property
    def null_model(self) -> Path:
        return self.root / "models" / "null"

    @property
    def null_rlhf(self) -> Path:
        return self.root / "rlhf-null"

    @property
    def pair_json(self) -> Path:
        return self.root / "models" / "pair.json"

    @property
    def rlhf(self) -> Path:
        return self.root / "rlhf"

    @property
    def diff(self) -> Path:
        return self.root / "diff"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def saes(self) -> Path:
        return self.root / "saes"

    @property
    def target(self) -> Path:
        return self.root / "target"

    @property
    def irm(self) -> Path:
        return self.root / "irm"

    @property
    def validate(self) -> Path:
        return self.root / "validate"

    @property
    def labels(self) -> Path:
        return self.root / "labels"

    @property
    def llm_label_cache(self) -> Path:
        """The LLM labeler's answers, one file per prompt: outside ``labels/`` (which is
        replaced in one rename) so that a killed labelling run resumes."""
        return self.root / "labels-llm-cache"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def cards(self) -> Path:
        return self.diff / "cards.json"

    def features_table(self, layer: int) -> Path:
        return self.diff / f"features_layer{layer}.csv"

    def matching_file(self, layer: int) -> Path:
        return self.diff / f"matching_layer{layer}.json"

    def sae_dir(self, model: str, hook: str, width: int) -> Path:
        return self.saes / model / hook / str(width)

    @property
    def model_dirs(self) -> Path:
        return self.root / "models" / "dirs.json"

    @property
    def rlhf_summary(self) -> Path:
        return self.rlhf / "summary.json"

    @property
    def null_summary(self) -> Path:
        return self.null_rlhf / "summary.json"

    @property
    def rlhf_metrics(self) -> Path:
        return self.rlhf / "metrics.jsonl"

    @property
    def layers_json(self) -> Path:
        return self.diff / "layers.json"

    @property
    def features_json(self) -> Path:
        return self.diff / "features.json"

    @property
    def mmcs(self) -> Path:
        return self.saes / "mmcs.json"

    @property
    def irm_metrics(self) -> Path:
        return self.irm / "metrics.json"

    @property
    def irm_coefficients(self) -> Path:
        return self.irm / "coefficients.safetensors"

    @property
    def word_attribution(self) -> Path:
        return self.irm / "word_attribution.json"

    @property
    def word_utilities(self) -> Path:
        return self.irm / "word_utilities.csv"

    @property
    def report_json(self) -> Path:
        return self.report / "report.json"


def write_model_dirs(run_dir: Path, dirs: dict[str, Path]) -> None:
    """``models/dirs.json``: where each model of the pair is. Folders inside the run folder are
    stored relative to it and others absolute, so the run can be moved and read from any
    working directory (``irmlens report`` reloads the models)."""
    root = Path(run_dir).resolve()
    out = {}
    for name, d in dirs.items():
        d = Path(d).resolve()
        out[name] = str(d.relative_to(root)) if d.is_relative_to(root) else str(d)
    from irmlens.io import atomic_write_json

    atomic_write_json(Path(run_dir) / "models" / "dirs.json", out)


def read_model_dirs(run_dir: Path) -> dict[str, Path]:
    """The model folders ``write_model_dirs`` recorded, as paths usable from here."""

    def resolve(d: str) -> Path:
        if Path(d).is_absolute():
            return Path(d)
        inside = Path(run_dir) / d
        # runs written before 2026-11-27 stored paths relative to the working directory
        return inside if inside.exists() or not Path(d).exists() else Path(d)

    from irmlens.io import read_json

    return {
        name: resolve(d) for name, d in read_json(Path(run_dir) / "models" / "dirs.json").items()
    }


def claim_run_dir(paths: RunPaths, cfg) -> None:
    """Record ``cfg`` as the run folder's config, refusing a folder that holds a different study.
    The comparison is on the resolved config text, so a run written by an irmlens with other
    settings or defaults is refused too: its outputs may come from another recipe (base model,
    null pair, dictionaries). A ``config.toml`` damaged since it was written (its record says
    what it held) is rewritten when ``cfg`` is the config it recorded."""
    import hashlib

    from irmlens.config import dump_config
    from irmlens.errors import ConfigError
    from irmlens.io import atomic_write_text
    from irmlens.records import damaged_files, read_record, record_path, write_record

    cfg_text = dump_config(cfg)
    if paths.config.exists():
        same = paths.config.read_bytes() == cfg_text.encode("utf-8")
        rec = read_record(paths.root, "config")
        entry = rec["files"].get("config.toml") if rec is not None else None
        recorded = entry.get("sha256") if isinstance(entry, dict) else None
        if recorded is not None and damaged_files(paths.root, rec):
            if recorded != hashlib.sha256(cfg_text.encode("utf-8")).hexdigest():
                raise ConfigError(
                    f"{paths.config} has changed since the run was made (its sha256 differs from "
                    f"{record_path(paths.root, 'config')}), and this config is not the one it "
                    "recorded. Run again with the config this run was made with, which rewrites "
                    "it, or choose another --out folder."
                )
            same = True  # the damaged file held exactly this config: write it again
        if not same:
            raise ConfigError(
                f"{paths.root} already holds a run with a different config ({paths.config}), or "
                "one written by another irmlens version. Choose another --out folder, or delete "
                "that one to start over."
            )
    paths.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(paths.config, cfg_text)
    write_record(paths.root, "config", [paths.config])


def read_run_config(paths: RunPaths):
    """The config a finished run was made with (its ``config.toml``), verified against its
    record; a damaged or unreadable one is named with the fix."""
    from irmlens.config import load_config
    from irmlens.errors import ConfigError, DamagedFileError
    from irmlens.records import verify_stage

    if not paths.config.exists():
        raise ConfigError(
            f"{paths.root} is not an irmlens run folder (no config.toml); run "
            f"`irmlens run CONFIG --out {paths.root}` first"
        )
    verify_stage(paths.root, "config", required=False)  # runs made before records have none
    try:
        tomllib.loads(paths.config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise DamagedFileError(
            f"{paths.config}, the run's config, cannot be read ({e}). Restore it: run "
            f"`irmlens run YOUR_CONFIG --out {paths.root}` with the config the run was made with"
        ) from None
    # readable: a value refused now (a rule newer than the run) is a ConfigError saying so
    return load_config(paths.config, check_device=False)


# folders this process holds the lock of, with how many nested holders (``irmlens report`` runs
# the cards stage through run_study, which takes the same lock again)
_HELD: dict[Path, list] = {}


def _holder_text(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process"
    return (
        f"pid {info.get('pid')} on {info.get('host')}, running `{info.get('command')}` since "
        f"{info.get('started')}"
    )


@contextlib.contextmanager
def run_lock(root: str | Path) -> Iterator[None]:
    """Hold the run folder's lock (created if need be) for the block; refuse if another process
    holds it (``RunLockedError`` naming that process). Re-entrant within one process."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    key = root.resolve()
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    path = root / LOCK_FILENAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunLockedError(
            f"{root} is in use by another irmlens ({_holder_text(path)}). Wait for it to finish "
            "(a killed process releases the lock at once), or give this run another --out folder."
        ) from None
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:])[:300],
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # no holder any more: the file stays, empty and unlocked
        os.close(fd)

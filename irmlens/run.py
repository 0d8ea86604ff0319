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
    def irm(self) -> Path:
        return self.root / "irm"

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

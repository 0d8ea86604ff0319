"""The one-writer lock of a folder irmlens writes: a run folder, or an SAE folder of ``sae-train``.

Every command that writes such a folder holds its lock for as long as it writes, so two commands on
one folder cannot interleave their steps: the second is refused at once, naming the holder's pid.
The lock is an ``flock`` on a lock file, which the kernel releases when its process exits however
it exits, so a lock left by a killed process is stale by construction and never blocks the rerun
that resumes it.
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
from pathlib import Path

from irmlens.errors import ReadOnlyRunError, RunLockedError

LOCK_FILENAME = ".irmlens.lock"


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
    """Hold the run folder's lock (``root/.irmlens.lock``, created if need be) for the block;
    refuse if another process holds it (``RunLockedError`` naming that process). Re-entrant
    within one process."""
    root = Path(root)
    _make_folder(root, str(root))
    with file_lock(root / LOCK_FILENAME, what=str(root)):
        yield


def sibling_lock_path(folder: str | Path) -> Path:
    """The lock file of a folder that is replaced whole when written (an SAE folder): beside it,
    ``.<name>.irmlens.lock``, since a lock file inside would be swapped out with the folder."""
    folder = Path(folder).resolve()
    return folder.with_name(f".{folder.name}{LOCK_FILENAME}")


@contextlib.contextmanager
def file_lock(path: str | Path, what: str, remove: bool = False) -> Iterator[None]:
    """Hold the ``flock`` of ``path`` (created if need be) for the block; ``what`` names the
    folder it guards in the refusal. Re-entrant within one process. ``remove``: unlink the lock
    file on release (while still holding it), so that a lock beside a user's folder leaves
    nothing behind; a process that opened the file just before is then holding a removed file,
    which it sees (another inode at ``path``) and opens again."""
    path = Path(path)
    _make_folder(path.parent, what)
    key = path.resolve()
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    while True:
        fd = _open_lock_file(path, what)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLockedError(
                f"{what} is in use by another irmlens ({_holder_text(path)}). Wait for it to "
                "finish (a killed process releases the lock at once), or give this run another "
                "--out folder."
            ) from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break  # the file at path is the one locked
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder removed it as we opened it: take the new one
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
            if remove:
                path.unlink()
            else:
                os.ftruncate(fd, 0)  # no holder any more: the file stays, empty and unlocked
        os.close(fd)


def _make_folder(folder: Path, what: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # read-only, a file on the way, no such device: say so
        raise ReadOnlyRunError(
            f"{what} cannot be created ({e.strerror}: {folder}): give a folder where you can "
            "write files"
        ) from None


def _open_lock_file(path: Path, what: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # a read-only folder or file system: say so, not a bare OSError
        raise ReadOnlyRunError(
            f"{what} cannot be written ({e.strerror}: {path}): irmlens takes a lock file there "
            "before it writes anything. Make the folder writable, or copy it somewhere writable "
            "and give the copy (`cp -r RUN COPY`, then the command on COPY); `irmlens.Study.load"
            "(RUN)` reads a finished run without writing."
        ) from None

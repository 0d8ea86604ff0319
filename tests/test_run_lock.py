"""Two irmlens processes on one run folder (issue 18, defect 3): the second is refused at once,
naming the holder, and the folder holds one consistent run. A lock whose holder died is stale by
construction (an flock dies with its process) and never blocks the resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from irmlens.cli import main
from irmlens.errors import RunLockedError
from irmlens.io import read_jsonl
from irmlens.run import LOCK_FILENAME, run_lock

ROOT = Path(__file__).resolve().parents[1]
HOLD = (
    "import sys, time\n"
    "from irmlens.run import run_lock\n"
    "with run_lock(sys.argv[1]):\n"
    "    print('locked', flush=True)\n"
    "    time.sleep(120)\n"
)


def _hold(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_held_folder_is_refused_naming_the_holder(tmp_path, capsys):
    run = tmp_path / "run"
    holder = _hold(run)
    try:
        for argv in (
            ["run", str(ROOT / "tests/micro.toml"), "--out", str(run)],
            ["rlhf", str(ROOT / "tests/micro.toml"), "--out", str(run)],
        ):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert f"pid {holder.pid}" in err and "in use by another irmlens" in err
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILENAME]  # nothing written
        with pytest.raises(RunLockedError):
            with run_lock(run):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holder_leaves_no_lock_behind(tmp_path):
    run = tmp_path / "run"
    holder = _hold(run)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert (run / LOCK_FILENAME).exists()  # the file stays; its lock died with the process
    with run_lock(run):
        info = json.loads((run / LOCK_FILENAME).read_text())
        assert info["pid"] == os.getpid()
        with run_lock(run):  # re-entrant in one process (report -> cards stage)
            pass
    assert (run / LOCK_FILENAME).read_text() == ""


def test_two_concurrent_rlhf_runs_leave_one_consistent_run(micro_base, tmp_path):
    """The reproduced defect: both exited 0 and metrics.jsonl held every step twice."""
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "irmlens", "rlhf", str(ROOT / "tests/micro.toml")]
    argv += ["--out", str(run), "--steps", "2"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    procs = []
    for _ in range(2):
        procs.append(subprocess.Popen(argv, env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True))
        time.sleep(0.5)
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    refused = next(err for rc, err in results if rc == 2)
    assert "in use by another irmlens" in refused
    steps = [row["step"] for row in read_jsonl(run / "rlhf" / "metrics.jsonl")]
    assert steps == [1, 2]
    assert (run / "models" / "rlhf" / "config.json").exists()

"""Data-parallel caching: 2 processes under torchrun (gloo on CPU) write the same shards
(sha256), the same statistics and one manifest, as 1 process does."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("ddp_cache_worker.py")


def test_two_process_cache_writes_the_shards_and_manifest_one_process_writes(tmp_path):
    one = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path / "one")], capture_output=True, text=True
    )
    assert one.returncode == 0, one.stderr[-2000:]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    two = subprocess.run(
        [*launch, str(WORKER), str(tmp_path / "two")], capture_output=True, text=True
    )
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    m1 = json.loads((tmp_path / "one/manifest.json").read_text())
    m2 = json.loads((tmp_path / "two/manifest.json").read_text())
    assert m1["n_shards"] == 7 and len(m1["files"]) > 7 * 4  # 2 models x 4 hooks, + log-probs
    assert m2["files"] == m1["files"]  # every shard's sha256 (and the tokens')
    assert m2["statistics"] == m1["statistics"] and m2["shapes"] == m1["shapes"]
    assert sorted(p.name for p in (tmp_path / "two").glob("progress*")) == ["progress.json"]
    p1 = json.loads((tmp_path / "one/progress.json").read_text())
    p2 = json.loads((tmp_path / "two/progress.json").read_text())
    assert p2 == p1


@pytest.mark.slow  # two more launches (about 30 s): the equivalence test above stays in make test
def test_a_cache_begun_by_two_processes_is_resumed_by_one(tmp_path):
    """Kill-free version of a resume across process counts: the 2-process cache's shards verify
    for a later 1-process run, which recomputes none of them (same files, same mtimes)."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    two = subprocess.run(
        [*launch, str(WORKER), str(tmp_path / "c")], capture_output=True, text=True
    )
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    shards = sorted((tmp_path / "c").rglob("*.safetensors"))
    before = {p: p.stat().st_mtime_ns for p in shards}
    (tmp_path / "c/manifest.json").unlink()
    one = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path / "c")], capture_output=True, text=True
    )
    assert one.returncode == 0, one.stderr[-2000:]
    after = {p: p.stat().st_mtime_ns for p in shards if p.name != "tokens.safetensors"}
    assert all(before[p] == t for p, t in after.items())
    assert (tmp_path / "c/manifest.json").exists()


@pytest.mark.slow  # a third launch (~25 s); the library-level 2-process test above is in make test
def test_irmlens_cache_under_torchrun_rebuilds_a_studys_cache_file_for_file(micro_run, tmp_path):
    """The CLI path: ``torchrun --nproc_per_node 2 -m irmlens cache`` on a copy of the micro
    study without its cache: rank 0 finds the stages before it done, both ranks cache, and the
    shards (sha256), statistics and record match the 1-process study's."""
    from irmlens.run import RunPaths

    run = tmp_path / "micro"
    shutil.copytree(micro_run, run, symlinks=True)
    shutil.rmtree(RunPaths(run).cache)
    config = Path(__file__).resolve().parents[1] / "micro.toml"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    two = subprocess.run(
        [*launch, "-m", "irmlens", "cache", str(config), "--out", str(run)],
        capture_output=True,
        text=True,
    )
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    assert "shards" in two.stdout and "layers: done, skipping" in two.stdout
    m1 = json.loads((RunPaths(micro_run).cache / "manifest.json").read_text())
    m2 = json.loads((RunPaths(run).cache / "manifest.json").read_text())
    assert m2["n_shards"] == m1["n_shards"] >= 2  # both ranks had shards to write
    assert m2["files"] == m1["files"] and m2["statistics"] == m1["statistics"]
    # the completion record lists the same files; only the manifest's own bytes differ (it
    # names the run folder's model paths)
    got = json.loads((run / ".records/cache.json").read_text())["files"]
    want = json.loads((micro_run / ".records/cache.json").read_text())["files"]
    assert got.keys() == want.keys()
    assert {k: v for k, v in got.items() if not k.endswith("manifest.json")} == {
        k: v for k, v in want.items() if not k.endswith("manifest.json")
    }


def test_rank_zero_runs_the_earlier_stages_with_torchruns_variables_hidden(monkeypatch):
    """What trl's accelerate and the SAE trainers read to decide they are one of several
    processes is absent inside the view, and back after it."""
    import os

    from irmlens.pipeline import TORCHRUN_VARIABLES, _one_process_view

    for name in TORCHRUN_VARIABLES:
        monkeypatch.setenv(name, "2")
    with _one_process_view():
        assert not any(name in os.environ for name in TORCHRUN_VARIABLES)
    assert all(os.environ[name] == "2" for name in TORCHRUN_VARIABLES)


def test_other_commands_refuse_torchrun_with_the_way_to_scale_out(monkeypatch, capsys):
    from irmlens.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["run", "experiments/configs/tiny.toml"]) == 2
    err = capsys.readouterr().err
    assert "irmlens run runs in one process" in err and "-m irmlens cache" in err

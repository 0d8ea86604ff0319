"""kill -9 in the middle of SAE training, re-run: it resumes from the newest complete checkpoint
and ends with the same SAE as an uninterrupted run; `sae-train --cache` reads irmlens caches."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from sae_lens import SAE

from sae_training.train import _complete_checkpoints

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, make_random_cache):
    out = tmp_path_factory.mktemp("cache")
    return make_random_cache(out, 400, 64, 32, 200, shard_rows=50, skip_first_position=True)


def _cmd(cache_dir, out):
    return [
        sys.executable,
        "-m",
        "sae_training.cli",
        "--cache",
        str(cache_dir),
        "--model",
        "base",
        "--hook",
        HOOK,
        "--width",
        "8x",
        "--epochs",
        "12",
        "--batch-size",
        "256",
        "--checkpoints",
        "6",
        "--out",
        str(out),
    ]


# slow (~22 s: three launches); make test keeps the in-process interrupted-training resume
# (test_sae_train.py) and the kill -9 test of the cache, the stage that writes the most
@pytest.mark.slow
def test_kill_during_training_then_resume(cache_dir, tmp_path):
    out = tmp_path / "sae"
    ckpt = tmp_path / ".sae.checkpoints"
    proc = subprocess.Popen(
        _cmd(cache_dir, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while len(_complete_checkpoints(ckpt)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists() and len(_complete_checkpoints(ckpt)) >= 2
    assert subprocess.run(_cmd(cache_dir, out), capture_output=True).returncode == 0
    assert not ckpt.exists()
    resumed = SAE.load_from_disk(str(out))
    clean = tmp_path / "clean"
    assert subprocess.run(_cmd(cache_dir, clean), capture_output=True).returncode == 0
    reference = SAE.load_from_disk(str(clean))
    assert torch.allclose(resumed.W_dec, reference.W_dec, atol=1e-5)
    assert torch.allclose(resumed.b_enc, reference.b_enc, atol=1e-5)
    shutil.rmtree(clean)

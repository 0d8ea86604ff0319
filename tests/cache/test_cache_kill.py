"""kill -9 in the middle of caching, re-run: the cache completes, equal to an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from irmlens.cache.store import cache_is_complete, load_activations

SCRIPT = r"""
import sys, torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from irmlens.cache.capture import build_paired_cache
from irmlens.cache.tokens import TokenRows

def model(seed):
    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(n_layers=3, d_model=128, n_ctx=64, d_head=32, n_heads=4, d_mlp=512,
                                  d_vocab=500, act_fn="gelu", normalization_type="LN")
    return HookedTransformer(cfg).eval()

g = torch.Generator().manual_seed(0)
tokens = torch.randint(1, 500, (480, 64), generator=g)
tokens[:, 0] = 0
valid = torch.ones_like(tokens, dtype=torch.bool)
valid[:, 0] = False
rows = TokenRows(tokens, valid, torch.full_like(tokens, -1), [])
build_paired_cache({"base": model(0), "rlhf": model(1)}, rows, [1, 2], sys.argv[1], {}, batch_size=8, shard_rows=8)
"""


def _run(out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _n_done(out: Path) -> int:
    try:
        return len(json.loads((out / "progress.json").read_text())["shards"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def test_kill_during_caching_then_resume(tmp_path):
    killed = tmp_path / "killed"
    proc = _run(killed)
    deadline = time.time() + 120
    while _n_done(killed) < 40 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "caching finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not cache_is_complete(killed)
    done_at_kill = _n_done(killed)
    assert 0 < done_at_kill < 4 * 60
    assert _run(killed).wait(timeout=300) == 0
    assert cache_is_complete(killed)
    clean = tmp_path / "clean"
    assert _run(clean).wait(timeout=300) == 0
    for model in ("base", "rlhf"):
        for hook in ("blocks.1.hook_resid_post", "blocks.2.hook_resid_post"):
            assert torch.equal(
                load_activations(killed, model, hook), load_activations(clean, model, hook)
            )

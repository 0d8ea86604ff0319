"""The process-wide allocator setting of the irmlens and sae-train commands (irmlens/allocator.py),
and the two CPU-only savings of the RLHF stage: neither changes a number computed."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

_PROBE = "from irmlens.allocator import keep_freed_memory; print(keep_freed_memory())"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
@pytest.mark.parametrize(
    "env,expected", [({}, "True"), ({"IRMLENS_KEEP_FREED_MEMORY": "0"}, "False")]
)
def test_keep_freed_memory_is_applied_unless_switched_off(env, expected, monkeypatch):
    monkeypatch.delenv("IRMLENS_KEEP_FREED_MEMORY", raising=False)
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env={**os.environ, **env}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == expected


_STEPS = """
import torch
from irmlens.allocator import keep_freed_memory
if {apply}:
    assert keep_freed_memory()
torch.manual_seed(0)
w = torch.randn(256, 4096, requires_grad=True)
total = 0.0
for _ in range(5):  # [4096, 4096] products: blocks over glibc's 32 MB mmap threshold
    x = torch.randn(4096, 256)
    loss = torch.log_softmax(x @ w, -1).mean()
    loss.backward()
    total += float(loss)
print(repr(total), repr(float(w.grad.sum())))
"""


def test_the_same_numbers_with_and_without_it():
    outs = [
        subprocess.run(
            [sys.executable, "-c", _STEPS.format(apply=a)], capture_output=True, text=True
        )
        for a in (False, True)
    ]
    assert all(o.returncode == 0 for o in outs), [o.stderr[-1000:] for o in outs]
    assert outs[0].stdout == outs[1].stdout


def test_trl_forced_collections_are_skipped_on_cpu_and_restored():
    import types

    from irmlens.rlhf.train import RLHFConfig, _common_trl_args, _without_forced_collections

    calls = []
    module = types.SimpleNamespace(gc=types.SimpleNamespace(collect=lambda: calls.append(1)))
    real = module.gc
    with _without_forced_collections(module):
        module.gc.collect()
    module.gc.collect()
    assert module.gc is real
    assert calls == ([1, 1] if torch.cuda.is_available() else [1])
    args = _common_trl_args(RLHFConfig(), out=Path("unused"), logs=Path("unused-logs"))
    assert args["gradient_checkpointing"] is torch.cuda.is_available()

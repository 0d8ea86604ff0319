"""Data-parallel SAE training: 2 processes (torchrun, gloo on CPU) give the same SAE as 1 process."""

import subprocess
import sys

import torch
from sae_lens import SAE
from safetensors.torch import save_file


def test_two_process_ddp_matches_one_process(tmp_path):
    g = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(24, 16, generator=g), dim=1)
    codes = torch.rand(4096, 24, generator=g) * (torch.rand(4096, 24, generator=g) < 0.1)
    save_file({"activations": codes @ dirs * 3}, str(tmp_path / "acts.safetensors"))
    common = [
        "--activations",
        str(tmp_path / "acts.safetensors"),
        "--hook",
        "h",
        "--width",
        "4x",
        "--epochs",
        "3",
        "--batch-size",
        "256",
        "--lr",
        "3e-3",
        "--device",
        "cpu",
    ]
    single = subprocess.run(
        [sys.executable, "-m", "sae_training.cli", *common, "--out", str(tmp_path / "one")],
        capture_output=True,
        text=True,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "sae_training.cli",
            *common,
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
    )
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    one, two = SAE.load_from_disk(str(tmp_path / "one")), SAE.load_from_disk(str(tmp_path / "two"))
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        a, b = getattr(one, name), getattr(two, name)
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (name, (a - b).abs().max())
    assert not torch.equal(
        one.W_dec, SAE.load_from_disk(str(tmp_path / "one")).W_dec * 0
    )  # trained

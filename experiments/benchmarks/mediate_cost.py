"""What the mediate stage costs, as a multiple of one forward + backward pass of the RLHF model
over the same rows, both measured in this run on this machine (issue 30: the stage on the tiny
default in at most 90 s and on SmolLM2 in at most 10 minutes on 2 CPU cores).

    python experiments/benchmarks/mediate_cost.py RUN_DIR [--repeat 3]

Reruns the stage on a finished run folder (its ``mediate/`` is replaced by the same numbers: the
stage is deterministic; its record is rewritten) with the models already loaded, then times the RLHF model's forward and
backward pass over the ``mediate.n_rows`` measured rows (the median of ``--repeat``). The stage's
floor is the forward passes its measurements need: per text set and metric sweep two per site,
per basis and direction one per k and re-checked component (k = 1 is the first re-checked one),
per layer and direction one forward and backward for attribution, shared by every basis; the
printed count of those passes is the bound any implementation patching whole models could reach.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch


def main() -> None:
    from irmlens.cache.store import load_token_rows
    from irmlens.config import load_config
    from irmlens.io import read_json
    from irmlens.pipeline import record_stage
    from irmlens.run import RunPaths
    from irmlens.stages import mediate
    from irmlens.stages.context import StudyContext

    p = argparse.ArgumentParser()
    p.add_argument("run_dir", type=Path)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--n-rows", type=int, help="override mediate.n_rows (a cost/precision probe)")
    args = p.parse_args()
    paths = RunPaths(args.run_dir)
    cfg = load_config(paths.config)
    if args.n_rows:
        cfg = replace(cfg, mediate=replace(cfg.mediate, n_rows=args.n_rows))
    ctx = StudyContext(cfg, paths, frozenset({"mediate"}))
    rlhf = ctx.pair.get()["rlhf"]  # loaded before the clock starts
    t0 = time.perf_counter()
    mediate.run(ctx)
    stage = time.perf_counter() - t0
    record_stage(paths, "mediate", stage, ctx)  # its new outputs, as the pipeline records them
    rows = load_token_rows(paths.cache)
    n = min(cfg.mediate.n_rows, len(rows.tokens) // 3)
    tokens = rows.tokens[:n].to(next(rlhf.parameters()).device)
    times = []
    for _ in range(args.repeat):
        rlhf.zero_grad(set_to_none=True)
        t = time.perf_counter()
        with torch.enable_grad():
            rlhf(tokens).float().logsumexp(-1).mean().backward()
        times.append(time.perf_counter() - t)
    rlhf.zero_grad(set_to_none=True)
    unit = statistics.median(times)
    found = read_json(paths.mediate / "mediation.json")
    n_sites = len(found["sweep"]["sites"])
    n_sweeps = len({s["text"] for s in found["sweeps"]})
    # per curve: one patch per k and per re-checked component, k = 1 being the first re-checked
    # one's; per layer and direction: the metric and its gradient at the start, shared by bases
    n_curve_passes = sum(
        len(c[d]["curve"]) + max(0, min(cfg.mediate.recheck, c[d]["n_components"]) - 1)
        for layer in found["layers"].values()
        for c in layer["bases"].values()
        for d in ("removed", "reproduced")
    ) + 4 * len(found["layers"])
    passes = n_sweeps * (2 * n_sites + 2) + n_curve_passes
    print(f"rows {n}, {n_sites} sweep sites, {len(found['layers'])} studied layers")
    print(f"mediate stage: {stage:.1f} s (the models loaded before)")
    print(f"one forward + backward of the RLHF model over the rows: {unit:.3f} s")
    print(f"stage / (forward + backward): {stage / unit:.0f}x")
    print(
        f"the stage's whole-model passes: about {passes}; at the forward + backward's cost "
        f"(an upper bound per pass) {passes * unit:.0f} s"
    )


if __name__ == "__main__":
    main()

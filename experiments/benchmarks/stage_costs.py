"""What each stage of a finished run cost, from its completion records (``.records/*.json``).

    python experiments/benchmarks/stage_costs.py RUN_DIR [--stages validate,labels]

Prints every stage's seconds (as the pipeline measured them, in that run, on that machine) and
its share of the whole pipeline, and the named stages' cost as a ratio to the rest of the run,
so that "the validation adds X% to the study" is a ratio measured in one run (issue 14: the
validate and labels stages must keep ``make demo`` within its previous time plus 20%).
Stages that were skipped (done by an earlier process) or recorded by an irmlens that did not
time them show ``n/a``: time a run from scratch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from irmlens.pipeline import STAGES
from irmlens.records import RECORDS_DIR


def stage_seconds(run_dir: Path) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for stage in STAGES:
        p = run_dir / RECORDS_DIR / f"{stage.name}.json"
        out[stage.name] = json.loads(p.read_text()).get("seconds") if p.exists() else None
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir", type=Path)
    p.add_argument("--stages", default="validate,labels")
    args = p.parse_args()
    seconds = stage_seconds(args.run_dir)
    known = {k: v for k, v in seconds.items() if v is not None}
    total = sum(known.values())
    print(f"{'stage':10s} {'seconds':>9s} {'share':>7s}")
    for name, s in seconds.items():
        print(f"{name:10s} " + ("      n/a" if s is None else f"{s:9.1f} {s / total:7.1%}"))
    named = [s.strip() for s in args.stages.split(",") if s.strip()]
    cost = sum(known.get(n, 0.0) for n in named)
    rest = total - cost
    print(
        f"pipeline total {total:.0f} s; {'+'.join(named)}: {cost:.0f} s = "
        f"{cost / rest:.1%} of the rest of the run ({rest:.0f} s)"
        if rest > 0
        else ""
    )


if __name__ == "__main__":
    main()

"""Are two finished runs the same study result? Compares the files a study's conclusions come from.

    python experiments/compare_runs.py RUN_A RUN_B [--rtol 0]

Compared, value by value: the RLHF (and null) model weights, every SAE's weights and metrics,
the IRM's coefficients, ``irm/`` (metrics, word attribution, word utilities), ``diff/`` (layers,
features, per-layer feature tables and matchings, cards), ``saes/mmcs.json`` and
``report/report.json``. Left out, because they
differ between two runs of the same study without saying anything about it: wall-clock timings
(report.json's ``timings``, whose stage order is the order the stages last ran) and throughputs
(keys naming seconds, times, dates, tokens per second, trl's ``eps``) and absolute paths (strings naming the run folder or a model folder). With ``--rtol 0`` (the default)
every other number must be equal; a tolerance compares floats relatively.

Used to check that the same config and seed give the same result twice on one machine, and that a
refactoring changed nothing. Exit status 0: the same; 1: differences, listed.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

IGNORED_KEY_PARTS = ("seconds", "time", "date", "per_second", "tokens_s", "elapsed", "created")
IGNORED_KEYS = {
    "eps",
    "path",
    "run_dir",
    "model_paths",
    "tokenizer",
    "generated",
    "irmlens",
    "timings",
}


def _ignored(key: str) -> bool:
    k = key.lower()
    return k in IGNORED_KEYS or any(part in k for part in IGNORED_KEY_PARTS)


def _is_path(value: str) -> bool:
    return value.startswith("/") or value.startswith("runs/")


def compare_values(a, b, where: str, rtol: float, out: list[str]) -> None:
    """Append a line to ``out`` for each difference between ``a`` and ``b``."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if _ignored(str(k)):
                continue
            if k not in a or k not in b:
                out.append(f"{where}.{k}: only in {'B' if k not in a else 'A'}")
                continue
            compare_values(a[k], b[k], f"{where}.{k}", rtol, out)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{where}: {len(a)} vs {len(b)} items")
            return
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            compare_values(x, y, f"{where}[{i}]", rtol, out)
    elif isinstance(a, float) or isinstance(b, float):
        if not isinstance(a, int | float) or not isinstance(b, int | float):
            out.append(f"{where}: {a!r} vs {b!r}")
        elif not (a == b or (math.isnan(a) and math.isnan(b))):
            if rtol == 0 or not math.isclose(a, b, rel_tol=rtol, abs_tol=1e-12):
                out.append(f"{where}: {a!r} vs {b!r}")
    elif isinstance(a, str) and isinstance(b, str) and _is_path(a) and _is_path(b):
        return
    elif a != b:
        out.append(f"{where}: {str(a)[:80]!r} vs {str(b)[:80]!r}")


def _csv_rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _number(v: str):
    try:
        return float(v)
    except ValueError:
        return v


def _weights_equal(a: Path, b: Path, out: list[str], where: str) -> None:
    from safetensors.torch import load_file

    fa, fb = sorted(a.glob("*.safetensors")), sorted(b.glob("*.safetensors"))
    if [f.name for f in fa] != [f.name for f in fb]:
        out.append(f"{where}: weight files {[f.name for f in fa]} vs {[f.name for f in fb]}")
        return
    for x, y in zip(fa, fb, strict=True):
        ta, tb = load_file(str(x)), load_file(str(y))
        if set(ta) != set(tb):
            out.append(f"{where}/{x.name}: other tensors")
            continue
        shapes = [k for k in ta if ta[k].shape != tb[k].shape]
        if shapes:
            out.append(
                f"{where}/{x.name}: other shapes ({shapes[0]}: {tuple(ta[shapes[0]].shape)} vs {tuple(tb[shapes[0]].shape)})"
            )
            continue
        worst = max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta)
        if worst > 0:
            out.append(f"{where}/{x.name}: weights differ (max |diff| {worst:.3g})")


def compare_runs(a: Path, b: Path, rtol: float = 0.0) -> list[str]:
    """The differences between two run folders (empty: the same result)."""
    out: list[str] = []
    for model in ("rlhf", "null"):
        da, db = a / "models" / model, b / "models" / model
        if da.exists() or db.exists():
            if not (da.exists() and db.exists()):
                out.append(f"models/{model}: only in one run")
            else:
                _weights_equal(da, db, out, f"models/{model}")
    saes = sorted(p.parent.relative_to(a) for p in (a / "saes").rglob("sae_weights.safetensors"))
    for rel in saes:
        if not (b / rel).exists():
            out.append(f"{rel}: missing in B")
        else:
            _weights_equal(a / rel, b / rel, out, str(rel))
    if (a / "irm").exists() and (b / "irm").exists():
        _weights_equal(a / "irm", b / "irm", out, "irm")  # coefficients.safetensors
    files = [
        "irm/metrics.json",
        "irm/word_attribution.json",
        "irm/word_utilities.csv",
        "diff/layers.json",
        "diff/features.json",
        "diff/cards.json",
        "saes/mmcs.json",
        "report/report.json",
    ]
    for pattern in ("features_layer*.csv", "matching_layer*.json"):
        files += sorted(str(p.relative_to(a)) for p in (a / "diff").glob(pattern))
    files += [str(rel / "metrics.json") for rel in saes if (a / rel / "metrics.json").exists()]
    for rel in files:
        fa, fb = a / rel, b / rel
        if not fa.exists() or not fb.exists():
            out.append(f"{rel}: missing in {'A' if not fa.exists() else 'B'}")
            continue
        if rel.endswith(".csv"):
            compare_values(_csv_rows(fa), _csv_rows(fb), rel, rtol, out)
        else:
            compare_values(json.loads(fa.read_text()), json.loads(fb.read_text()), rel, rtol, out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_a", type=Path)
    p.add_argument("run_b", type=Path)
    p.add_argument("--rtol", type=float, default=0.0, help="relative tolerance for floats")
    args = p.parse_args(argv)
    diffs = compare_runs(args.run_a, args.run_b, args.rtol)
    for line in diffs[:200]:
        print(line)
    if len(diffs) > 200:
        print(f"... and {len(diffs) - 200} more")
    n_files = "model, SAE and IRM weights; irm/, diff/, saes/ and report/ tables"
    print(f"{'SAME' if not diffs else f'{len(diffs)} DIFFERENCES'} ({n_files})")
    return 0 if not diffs else 1


if __name__ == "__main__":
    sys.exit(main())

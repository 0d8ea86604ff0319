"""experiments/compare_runs.py: what counts as the same study result."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("compare_runs", ROOT / "experiments/compare_runs.py")
compare_runs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_runs)


def _diffs(a, b, rtol=0.0):
    out = []
    compare_runs.compare_values(a, b, "r", rtol, out)
    return out


def test_numbers_must_match_but_timings_and_paths_are_ignored():
    a = {"tau": 0.412, "train_seconds": 238.0, "path": "/tmp/a/models/rlhf", "n": [1, 2]}
    b = {"tau": 0.412, "train_seconds": 240.1, "path": "/tmp/b/models/rlhf", "n": [1, 2]}
    assert _diffs(a, b) == []
    assert _diffs(a, b | {"tau": 0.4120001}) == ["r.tau: 0.412 vs 0.4120001"]
    assert _diffs(a, b | {"tau": 0.4120001}, rtol=1e-5) == []
    assert _diffs(a, b | {"n": [1, 3]}) == ["r.n[1]: '2' vs '3'"]
    assert _diffs(a, {k: v for k, v in b.items() if k != "n"}) == ["r.n: only in A"]
    assert _diffs({"word": "good"}, {"word": "bad"}) == ["r.word: 'good' vs 'bad'"]

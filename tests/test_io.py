"""irmlens.io: logs a killed process left behind are read back, damage is named."""

import json

import pytest

from irmlens.io import read_jsonl
from irmlens.rlhf.train import _truncate_metrics


def _log(path, rows, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def test_partial_last_line_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _log(path, [{"step": 1}, {"step": 2}], tail='{"step": 3, "rew')  # killed mid-append
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    assert read_jsonl(tmp_path / "absent.jsonl") == []


def test_damage_before_the_last_line_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2"):
        read_jsonl(path)


def test_resume_truncates_a_log_with_a_partial_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _log(path, [{"step": s} for s in (1, 2, 3, 4)], tail='{"step": 5, "re')
    _truncate_metrics(path, upto_step=2)
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    assert path.read_text().endswith("\n")
    assert not list(tmp_path.glob(".*.tmp"))  # rewritten atomically, no temp file left


def test_atomic_writes_get_the_mode_of_an_ordinary_write(tmp_path):
    import os

    from irmlens.io import atomic_write_text

    atomic_write_text(tmp_path / "report.json", "{}")
    (tmp_path / "plain.json").write_text("{}")
    mode = os.stat(tmp_path / "report.json").st_mode & 0o777
    assert mode == os.stat(tmp_path / "plain.json").st_mode & 0o777


def test_a_folder_is_replaced_in_one_exchange(tmp_path):
    from irmlens.io import atomic_dir, exchange_paths

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    assert exchange_paths(a, b)  # Linux with glibc >= 2.28, as on every machine we run on
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"
    with atomic_dir(a) as tmp:
        (tmp / "x").write_text("new")
    assert (a / "x").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # nothing left behind

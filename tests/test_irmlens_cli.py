"""The irmlens command line: what it refuses before doing any work."""

from pathlib import Path

from irmlens.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_rlhf_overrides_are_recorded_and_a_mismatch_is_refused(tmp_path, capsys):
    """`irmlens rlhf --reward zero` writes into the run's rlhf slot: the folder must say so, or a
    later `irmlens run` with the plain config would take the zero-reward model for its RLHF model."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text('name = "another study"\n')
    rc = main(["rlhf", str(ROOT / "tests/micro.toml"), "--out", str(run), "--reward", "zero"])
    assert rc == 2
    assert "different config" in capsys.readouterr().err
    assert (run / "config.toml").read_text() == 'name = "another study"\n'  # left as it was

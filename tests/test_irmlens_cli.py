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
    (run / ".records").mkdir()  # a run folder irmlens wrote (one without records: test_run_safety)
    rc = main(["rlhf", str(ROOT / "tests/micro.toml"), "--out", str(run), "--reward", "zero"])
    assert rc == 2
    assert "different config" in capsys.readouterr().err
    assert (run / "config.toml").read_text() == 'name = "another study"\n'  # left as it was


def test_a_lexicon_foreign_to_the_corpus_is_refused_before_any_work(assets, tmp_path, capsys):
    """Such a lexicon ran every stage and then crashed, advising to cache more held-out text."""
    lexicon = tmp_path / "foreign.tsv"
    lexicon.write_text("".join(f"zqxw{i}\t{i - 6}\n" for i in range(12)))
    cfg = tmp_path / "foreign.toml"
    cfg.write_text(f'name = "foreign"\n[data]\nlexicon = "{lexicon}"\n')
    assert main(["run", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "only 0 distinct word(s) of lexicon" in err and "Fix:" in err
    assert not (tmp_path / "run").exists()  # refused before the run folder is claimed


def test_version_and_help_show_the_version_and_every_default(capsys):
    import pytest

    from irmlens import __version__
    from sae_training.cli import main as sae_main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"irmlens {__version__}"
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    assert "(default: html,json,md,csv)" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        sae_main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: standard)" in out and "(default: 32)" in out
    with pytest.raises(SystemExit) as e:
        sae_main(["--version"])
    assert e.value.code == 0 and __version__ in capsys.readouterr().out

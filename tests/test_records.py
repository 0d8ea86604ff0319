"""Completion records of a run folder, here the config's own (``claim_run_dir``)."""

import pytest

from irmlens.config import StudyConfig, config_from_dict, dump_config
from irmlens.errors import ConfigError
from irmlens.records import read_record
from irmlens.run import RunPaths, claim_run_dir


def test_a_damaged_config_toml_is_rewritten_by_its_own_config_and_refuses_another(tmp_path):
    paths = RunPaths(tmp_path / "run")
    cfg = StudyConfig()
    claim_run_dir(paths, cfg)
    assert read_record(paths.root, "config")["files"]["config.toml"]["size"] == len(
        dump_config(cfg).encode()
    )
    text = paths.config.read_text()
    paths.config.write_text(text.replace("seed = 0", "seed = 1", 1))  # damaged, still TOML
    with pytest.raises(ConfigError, match="has changed since the run was made"):
        claim_run_dir(paths, config_from_dict({"seed": 1}))
    claim_run_dir(paths, cfg)  # the config it recorded: written again
    assert paths.config.read_text() == text
    with pytest.raises(ConfigError, match="already holds a run with a different config"):
        claim_run_dir(paths, config_from_dict({"seed": 2}))

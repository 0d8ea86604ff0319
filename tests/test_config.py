import tomllib
from pathlib import Path

import pytest

from irmlens.config import StudyConfig, config_from_dict, dump_config, load_config
from irmlens.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_configs_load_and_round_trip():
    for path in sorted((ROOT / "experiments/configs").glob("*.toml")) + [ROOT / "tests/micro.toml"]:
        cfg = load_config(path)
        assert config_from_dict(tomllib.loads(dump_config(cfg))) == cfg
    assert load_config(ROOT / "experiments/configs/tiny.toml").rlhf.algorithm == "ppo"


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[rlhf]\nstepz = 3\n")
    with pytest.raises(ConfigError, match="'rlhf.stepz'.*valid keys in \\[rlhf\\].*steps"):
        load_config(p)
    p.write_text("colour = 'red'\n")
    with pytest.raises(ConfigError, match="'colour'"):
        load_config(p)


def test_bad_values_are_reported():
    with pytest.raises(ConfigError, match="ppo|algorithm"):
        config_from_dict({"rlhf": {"algorithm": "dpo"}})
    assert StudyConfig().irm.heldout_fraction == 0.3

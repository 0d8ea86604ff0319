import tomllib
from pathlib import Path

import pytest

from irmlens.config import StudyConfig, config_from_dict, dump_config, load_config
from irmlens.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_configs_load_and_round_trip():
    for path in sorted((ROOT / "experiments/configs").glob("*.toml")) + [ROOT / "tests/micro.toml"]:
        on_cpu = not path.stem.endswith("-gpu")  # a GPU config names the device it needs
        cfg = load_config(path, check_device=on_cpu)
        assert config_from_dict(tomllib.loads(dump_config(cfg)), check_device=on_cpu) == cfg
    assert load_config(ROOT / "experiments/configs/tiny.toml").rlhf.algorithm == "ppo"


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[rlhf]\nstepz = 3\n")
    with pytest.raises(ConfigError, match="'rlhf.stepz'.*valid keys in \\[rlhf\\].*steps"):
        load_config(p)
    p.write_text("colour = 'red'\n")
    with pytest.raises(ConfigError, match="'colour'"):
        load_config(p)


def test_a_reporter_whose_package_is_missing_is_refused_at_load(monkeypatch):
    """rlhf.report_to is opt-in; one whose package is not importable fails at load, naming the
    package and the fix, not an ImportError in the middle of the RLHF stage."""
    import importlib.util

    assert config_from_dict({"rlhf": {"report_to": "none"}}).rlhf.report_to == "none"
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tensorboard" else real(name, *a),
    )
    with pytest.raises(ConfigError, match="needs the tensorboard package.*pip install tensorboard"):
        config_from_dict({"rlhf": {"report_to": "tensorboard"}})
    with pytest.raises(ConfigError, match="report_to"):
        config_from_dict({"rlhf": {"report_to": "mlflow"}})


def test_bad_values_are_reported():
    with pytest.raises(ConfigError, match="ppo|algorithm"):
        config_from_dict({"rlhf": {"algorithm": "dpo"}})
    assert StudyConfig().irm.heldout_fraction == 0.3


@pytest.mark.parametrize(
    "values, message",
    [
        ({"irm": {"cv_folds": "5"}}, r"irm\.cv_folds = '5' must be an integer"),
        ({"sae": {"lr": "1e-3"}}, r"sae\.lr = '1e-3' must be a number"),
        ({"irm": {"alphas": [1, "10"]}}, r"irm\.alphas .* must be a list like"),
        ({"layers": {"relative": 1}}, r"layers\.relative = 1 must be true or false"),
        ({"irm": {"cv_folds": 1}}, r"irm\.cv_folds = 1 must be an integer from 2 to 100"),
        ({"irm": {"alphas": []}}, r"irm\.alphas = \[\] must be a list of at least 1"),
        (
            {"irm": {"alphas": [0.0, 1.0]}},
            r"irm\.alphas = \[0\.0, 1\.0\] item 0\.0 must be a finite number > 0",
        ),
        ({"irm": {"n_shuffles": 0}}, r"irm\.n_shuffles = 0 must be an integer from 1 to"),
        (
            {"irm": {"space": "sae_pree"}},
            r"irm\.space = 'sae_pree' must be one of 'auto', 'sae_codes'",
        ),
        ({"sae": {"width_multipliers": []}}, r"sae\.width_multipliers = \[\]"),
    ],
)
def test_bad_values_fail_at_load_naming_the_key(values, message):
    """Caught when the config loads, not hours later inside a stage."""
    with pytest.raises(ConfigError, match=message):
        config_from_dict(values)


def test_numbers_of_either_kind_where_a_float_is_expected():
    cfg = config_from_dict(
        {"sae": {"lr": 1, "width_multipliers": [1.5, 3]}, "irm": {"alphas": [1, 10.0]}}
    )
    assert cfg.sae.lr == 1 and cfg.sae.width_multipliers == [1.5, 3]


@pytest.mark.parametrize(
    "values, message",
    [
        (
            {"irm": {"space": "topk_wide_codes"}, "sae": {"wide_topk": {"k": 0}}},
            r"irm\.space = 'topk_wide_codes' needs the wide TopK.*set sae\.wide_topk\.k >= 1",
        ),
        (
            {"irm": {"space": "multi_layer_pre"}, "layers": {"top_k": 1}},
            r"irm\.space = 'multi_layer_pre'.*set layers\.top_k >= 2",
        ),
        ({"layers": {"top_k": 5}, "pretrain": {"n_layer": 4}}, r"layers\.top_k = 5.*n_layer = 4"),
    ],
)
def test_configs_that_used_to_fail_hours_in_fail_at_load(values, message):
    """Each of these loaded and failed only after the SAEs were trained (issue 12)."""
    with pytest.raises(ConfigError, match=message):
        config_from_dict(values)
    ok = {"cache": {"hook_kinds": ["resid_post", "mlp_out"]}, "layers": {"top_k": 2}}
    config_from_dict(ok | {"irm": {"space": "multi_layer_pre"}})


def test_a_removed_key_of_an_older_run_still_loads_with_a_warning():
    with pytest.warns(UserWarning, match=r"pretrain\.time_budget_s is ignored"):
        cfg = config_from_dict({"pretrain": {"time_budget_s": 450.0, "max_steps": 7}})
    assert cfg.pretrain.max_steps == 7


def test_the_flat_dictionary_keys_of_earlier_configs_load_into_their_kinds_tables():
    """Issue 29: the wide TopK and crosscoder settings moved into [sae.wide_topk] and
    [sae.crosscoder]; a config (or a finished run's config.toml) that spells them the old way
    still loads, warning with the new key, and giving both spellings is refused."""
    import warnings

    old = {"sae": {"wide_topk_k": 8, "crosscoder": "l1", "crosscoder_l1_coefficient": 0.5}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = config_from_dict(old, check_device=False)
    said = " ".join(str(w.message) for w in caught)
    assert "sae.wide_topk.k" in said and "sae.crosscoder.architecture" in said
    assert cfg.sae.wide_topk.k == 8 and cfg.sae.crosscoder.architecture == "l1"
    assert cfg.sae.crosscoder.l1_coefficient == 0.5
    new = {
        "sae": {"wide_topk": {"k": 8}, "crosscoder": {"architecture": "l1", "l1_coefficient": 0.5}}
    }
    assert config_from_dict(new, check_device=False) == cfg
    with pytest.raises(ConfigError, match=r"sae\.wide_topk_k and sae\.wide_topk\.k both given"):
        config_from_dict({"sae": {"wide_topk_k": 8, "wide_topk": {"k": 4}}}, check_device=False)


def _old_spelling(text: str) -> str:
    """A dump as irmlens wrote it before [sae.wide_topk] and [sae.crosscoder] (flat keys)."""
    values = tomllib.loads(text)
    sae = values["sae"]
    for key, v in sae.pop("wide_topk").items():
        sae[f"wide_topk_{key}"] = v
    cc = sae.pop("crosscoder")
    sae["crosscoder"] = cc.pop("architecture")
    for key, v in cc.items():
        sae[f"crosscoder_{key}"] = v
    from irmlens.config import _toml_value

    def tables(name: str, table: dict) -> list[str]:  # keys the old spelling kept nested
        lines = [f"[{name}]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
        for k, v in table.items():
            lines += tables(f"{name}.{k}", v) if isinstance(v, dict) else []
        return lines

    out = [f"{k} = {_toml_value(v)}" for k, v in values.items() if not isinstance(v, dict)]
    for name, table in values.items():
        if isinstance(table, dict):
            out += tables(name, table)
    return "\n".join(out) + "\n"


def test_a_run_folder_written_before_the_keys_moved_is_the_same_study():
    """A finished run's config.toml in the flat spelling is claimed by the same config (the run
    resumes; its config.toml is rewritten), but not when a value differs or a key is missing."""
    from irmlens.config import same_study_respelled

    cfg = config_from_dict({"sae": {"crosscoder": {"k": 16}}}, check_device=False)
    old = _old_spelling(dump_config(cfg))
    assert "crosscoder_k = 16" in old and "[sae.crosscoder]" not in old
    assert same_study_respelled(old, cfg)
    assert not same_study_respelled(old.replace("crosscoder_k = 16", "crosscoder_k = 8"), cfg)
    assert not same_study_respelled(old.replace("crosscoder_k = 16\n", ""), cfg)  # a key missing

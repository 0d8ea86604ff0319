"""Every config key's range (``irmlens.config.RANGES``): bad values fail at load naming the key,
never minutes later inside a stage, and never with another exception than ConfigError."""

import dataclasses
import math
import tomllib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from irmlens.checks import check_dimensions
from irmlens.cli import main
from irmlens.config import (
    RANGES,
    StudyConfig,
    config_from_dict,
    dump_config,
    load_config,
)
from irmlens.errors import ConfigError

inf, nan = math.inf, math.nan


def _keys(obj, where=""):
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            yield from _keys(v, f"{where}{f.name}.")
        else:
            yield f"{where}{f.name}", v


def test_every_key_has_a_rule_and_the_defaults_fit_it():
    defaults = dict(_keys(StudyConfig()))
    assert sorted(defaults) == sorted(RANGES)
    for key, value in defaults.items():
        assert RANGES[key].problem(value) is None, key
        for edge in RANGES[key].edges():  # the edges the fuzz test draws are inside the range
            assert RANGES[key].problem(edge) is None, (key, edge)


# Each of these loaded and then crashed minutes into a stage, or ran to a meaningless report
# (issue 13). The message must name the key.
BAD = [
    ("irm.alphas", [1.0, inf]),
    ("irm.alphas", [nan]),
    ("diff.threshold", nan),
    ("diff.matching_threshold", nan),
    ("sae.lr", nan),
    ("sae.lr", inf),
    ("sae.epochs", inf),
    ("sae.k", 0),
    ("sae.k", 1000),  # > the narrowest width (2 x 128)
    ("sae.wide_topk.k", 100_000),
    ("cache.batch_size", 0),
    ("cache.n_ctx", 1),
    ("cache.shard_rows", 0),
    ("cache.max_rows", 0),
    ("rlhf.kl_coef", inf),
    ("rlhf.kl_coef", nan),
    ("rlhf.learning_rate", nan),
    ("rlhf.temperature", 0.0),
    ("rlhf.temperature", -1.0),
    ("rlhf.n_train_prompts", 0),
    ("rlhf.n_train_prompts", 10),  # fewer than one update's batch of prompts
    ("data.n_validation", 0),
    ("irm.nonlexicon_ratio", nan),
    ("pretrain.n_head", 3),  # does not divide d_model = 128
    ("model.device", "nonsense"),
    ("sae.l1_coefficient", -1.0),
    ("pretrain.max_steps", 0),
    ("pretrain.vocab_size", 0),
    ("irm.sparse_k", 100_000),
    ("diff.top_n", -1),
    ("diff.n_cards", -3),
    ("name", "../../x"),
    ("name", "/abs/x"),
    ("seed", -1),
    ("seed", 2**40),
    ("sae.width_multipliers", [0.001]),  # a width of 0
    ("sae.lr", 10**400),  # an int too large for a float: refused, not an OverflowError
]


def _nested(key, value):
    """``{"a": {"b": {"c": value}}}`` for key ``a.b.c``."""
    *tables, name = key.split(".")
    out = inner = {}
    for t in tables:
        inner = inner.setdefault(t, {})
    inner[name] = value
    return out


@pytest.mark.parametrize("key, value", BAD, ids=[f"{k}={v!r}" for k, v in BAD])
def test_bad_values_fail_at_load_naming_key_value_and_fix(key, value):
    with pytest.raises(ConfigError) as e:
        config_from_dict(_nested(key, value))
    msg = str(e.value)
    assert key in msg and ("must" in msg or "lower" in msg or "use" in msg), msg


def test_a_device_this_machine_lacks_fails_at_load():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match=r"model\.device = 'cuda'.*no CUDA GPU.*use \"cpu\""):
        config_from_dict({"model": {"device": "cuda"}})


def test_a_null_pair_that_would_train_nothing_fails_at_load():
    """It used to fail at the null stage, after the RLHF model had trained, with a traceback."""
    with pytest.raises(ConfigError, match=r"null\.reward = 'zero' trains nothing.*'grpo'"):
        config_from_dict({"null": {"reward": "zero"}, "rlhf": {"algorithm": "grpo"}})


def test_a_finished_runs_config_reads_on_a_machine_without_its_device(tmp_path):
    """A GPU run's folder is read on a laptop (report, Study.load); running it there is refused."""
    import torch

    from irmlens.run import RunPaths, read_run_config

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    (tmp_path / "config.toml").write_text('[model]\ndevice = "cuda"\n')
    assert read_run_config(RunPaths(tmp_path)).model.device == "cuda"
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        load_config(tmp_path / "config.toml")


def test_sizes_of_a_given_model_are_checked_against_its_dimensions():
    """The tiny model's sizes are in the config; a given model's come from its config.json."""
    cfg = config_from_dict({"model": {"base": "smollm2"}, "sae": {"k": 500}})
    check_dimensions(cfg, 576, 30, "SmolLM2")  # 2 x 576 >= 500
    with pytest.raises(ConfigError, match=r"sae\.k = 500 exceeds .* width 128 .*lower sae\.k"):
        check_dimensions(cfg, 64, 2, "a small model")
    with pytest.raises(ConfigError, match=r"layers\.top_k = 3 but a small model has 2 layers"):
        check_dimensions(config_from_dict({"layers": {"top_k": 3}}), 64, 2, "a small model")


def test_config_files_that_are_not_configs_fail_clearly(tmp_path):
    bad = tmp_path / "latin1.toml"
    bad.write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"not UTF-8 text .*save the config as UTF-8"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"is a folder, not a config file"):
        load_config(tmp_path)
    odd = tmp_path / "my study (v2).toml"
    odd.write_text("seed = 1\n")
    assert load_config(odd).name == "my-study-v2"  # a file name becomes a safe folder name


def test_out_naming_a_file_is_refused(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[data]\nn_heldout = 40\n")
    (tmp_path / "afile").write_text("keep me")
    assert main(["run", str(cfg), "--out", str(tmp_path / "afile")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "keep me"


def test_a_config_refused_by_the_data_claims_no_run_folder(assets, tmp_path, capsys):
    """It used to write config.toml first, so the fixed config was refused as 'a different
    config' until the folder was deleted by hand."""
    cfg = tmp_path / "c.toml"
    cfg.write_text("[data]\nn_heldout = 10000000\n")
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "data.n_heldout = 10000000" in err and "lower them" in err
    assert not out.exists()


# ------------------------------------------------------------------ property-based: the loader

_SCALARS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=12),
    st.sampled_from(["cuda", "cpu", "mps", "cuda:7", "../x", "/tmp/x", "", "vader", "auto"]),
)
_VALUES = st.one_of(
    _SCALARS,
    st.lists(_SCALARS, max_size=4),
    st.dictionaries(st.text(max_size=4), _SCALARS, max_size=2),
)


@st.composite
def _configs(draw):
    """A few keys of the real schema (and sometimes an unknown one), each given an edge of its
    range, a default, or anything at all."""
    values: dict = {}
    for key in draw(st.lists(st.sampled_from(sorted(RANGES)), min_size=1, max_size=6)):
        edges = RANGES[key].edges()
        choice = st.one_of(st.sampled_from(edges), _VALUES) if edges else _VALUES
        *tables, name = key.split(".")
        target = values
        for t in tables:
            target = target.setdefault(t, {}) if isinstance(target, dict) else None
        if isinstance(target, dict):
            target[name] = draw(choice)
    if draw(st.booleans()) and draw(st.booleans()):
        values[draw(st.sampled_from(["data", "sae", "zzz"]))] = draw(_VALUES)
    return values


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_configs())
def test_any_value_for_any_key_loads_or_fails_with_a_config_error(values):
    try:
        cfg = config_from_dict(values)
    except ConfigError:
        return
    # it loaded: every value is in its range, and it survives the run folder's round trip
    for key, value in _keys(cfg):
        assert RANGES[key].problem(value) is None, (key, value)
    assert config_from_dict(tomllib.loads(dump_config(cfg))) == cfg


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_as_a_config_file_load_or_fail_with_a_config_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "c.toml"
    path.write_bytes(data)
    try:
        load_config(path)
    except ConfigError:
        pass

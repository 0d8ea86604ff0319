"""A model folder never runs its own Python code unless the config allows it (issue 18, defect 1).

The attack: a GPT-2 folder at the relative path ``Qwen/Qwen-evil`` whose config.json carries an
``auto_map`` to its own ``evil.py``. TransformerLens turns ``trust_remote_code`` on by itself for
names starting like ``Qwen/Qwen-``, so handing it that relative path ran ``evil.py``.
"""

import json
import shutil
from pathlib import Path

import pytest

from irmlens.cli import main
from irmlens.errors import RemoteCodeError
from irmlens.models.hooked import check_remote_code, load_hooked_model
from irmlens.models.sources import resolve_base_model

EVIL = """import pathlib
pathlib.Path({marker!r}).write_text("code from the model folder ran")
from transformers import GPT2Config as EvilConfig, GPT2LMHeadModel as EvilModel
"""


def _evil_folder(tiny_hf_dir: Path, root: Path, marker: Path, auto_map: bool = True) -> Path:
    d = root / "Qwen" / "Qwen-evil"
    shutil.copytree(tiny_hf_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["n_ctx"] = cfg["n_positions"]  # no patched copy needed: TransformerLens reads it as is
    if auto_map:
        cfg["auto_map"] = {
            "AutoConfig": "evil.EvilConfig",
            "AutoModelForCausalLM": "evil.EvilModel",
        }
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "evil.py").write_text(EVIL.format(marker=str(marker)))
    return d


def test_relative_qwen_named_folder_with_auto_map_runs_nothing(tiny_hf_dir, tmp_path, monkeypatch):
    marker = tmp_path / "MARKER"
    _evil_folder(tiny_hf_dir, tmp_path, marker)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RemoteCodeError, match=r"model\.trust_remote_code = true"):
        resolve_base_model("Qwen/Qwen-evil")
    with pytest.raises(RemoteCodeError, match="auto_map"):
        load_hooked_model("Qwen/Qwen-evil")
    assert not marker.exists()


def test_a_study_on_such_a_folder_is_refused_before_any_work(
    assets, tiny_hf_dir, tmp_path, monkeypatch, capsys
):
    marker = tmp_path / "MARKER"
    _evil_folder(tiny_hf_dir, tmp_path, marker)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil.toml").write_text('name = "evil"\n[model]\nbase = "Qwen/Qwen-evil"\n')
    assert main(["run", "evil.toml", "--out", "runs/evil"]) == 2
    err = capsys.readouterr().err
    assert "asks to run its own Python code" in err and "model.trust_remote_code" in err
    assert not marker.exists()
    assert not (tmp_path / "runs/evil/cache").exists()


def test_same_name_without_auto_map_loads_from_an_absolute_copy(tiny_hf_dir, tmp_path, monkeypatch):
    """Even without auto_map, TransformerLens (which forces trust_remote_code for this name) only
    sees an absolute temporary copy of the config: nothing in the folder is imported."""
    marker = tmp_path / "MARKER"
    _evil_folder(tiny_hf_dir, tmp_path, marker, auto_map=False)
    monkeypatch.chdir(tmp_path)
    path = resolve_base_model("Qwen/Qwen-evil")
    assert path.is_absolute() and path == (tmp_path / "Qwen/Qwen-evil").resolve()
    model = load_hooked_model("Qwen/Qwen-evil")
    assert model.cfg.n_layers == 3
    assert not marker.exists()


def test_the_config_key_allows_it(tiny_hf_dir, tmp_path):
    d = _evil_folder(tiny_hf_dir, tmp_path, tmp_path / "MARKER")
    check_remote_code(d, trust_remote_code=True)  # the user's explicit opt-in
    with pytest.raises(RemoteCodeError):
        check_remote_code(d, trust_remote_code=False)
    tok_cfg = tmp_path / "tok_only"
    shutil.copytree(tiny_hf_dir, tok_cfg)
    t = json.loads((tok_cfg / "tokenizer_config.json").read_text())
    t["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (tok_cfg / "tokenizer_config.json").write_text(json.dumps(t))
    with pytest.raises(RemoteCodeError, match="tokenizer_config.json"):
        check_remote_code(tok_cfg, trust_remote_code=False)

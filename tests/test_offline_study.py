"""``irmlens data fetch CONFIG`` fetches everything a study needs from outside, so that the run
itself, with networking off, downloads nothing (issue 31: the LLM labeler's SmolLM2 was fetched
by the labels stage, 13 minutes into the default study)."""

import tomllib
from pathlib import Path

import pytest

from irmlens.cli import main
from irmlens.config import config_from_dict, dump_config
from irmlens.run import RunPaths

MICRO = Path(__file__).parent / "micro.toml"


@pytest.mark.slow
def test_data_fetch_then_an_offline_run_downloads_nothing(micro_run, tmp_path, monkeypatch):
    import irmlens.models.sources

    values = tomllib.loads(MICRO.read_text())
    paths = RunPaths(micro_run)
    values["model"] = {"rlhf": str(paths.rlhf_model), "null": str(paths.null_model)}
    values["labels"] = {"llm": "local", "llm_model": "smollm2"}
    cfg = tmp_path / "offline.toml"
    cfg.write_text(dump_config(config_from_dict(values)))
    assert main(["data", "fetch", str(cfg)]) == 0

    def downloaded(dest):
        raise AssertionError(f"the run downloaded {dest} mid-way")

    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(irmlens.models.sources, "_download_smollm2_gguf", downloaded)
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out)]) == 0
    from irmlens.io import read_json

    llm = read_json(out / "labels" / "labels.json")["llm"]
    assert llm["backend"] == "hf:smollm2-135m-instruct" and "correct" in llm["check"]

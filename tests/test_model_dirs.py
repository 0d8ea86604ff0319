"""models/dirs.json stays valid when the run folder is read from another working directory or
moved (a relative --out used to leave paths that only worked from the original directory)."""

import json
import shutil

from irmlens.run import read_model_dirs, write_model_dirs


def test_model_dirs_resolve_from_anywhere(tmp_path, monkeypatch):
    outside = tmp_path / "home" / "base-model"
    outside.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "tiny"
    (run / "models" / "rlhf").mkdir(parents=True)
    rel_run = run.relative_to(tmp_path)  # as `irmlens run ... --out runs/tiny` gives it
    write_model_dirs(rel_run, {"base": outside, "rlhf": rel_run / "models" / "rlhf"})
    stored = json.loads((run / "models" / "dirs.json").read_text())
    assert stored == {"base": str(outside), "rlhf": "models/rlhf"}

    monkeypatch.chdir(tmp_path / "home")  # another working directory
    dirs = read_model_dirs(run)
    assert dirs["rlhf"].resolve() == (run / "models" / "rlhf").resolve()
    assert dirs["base"] == outside and dirs["base"].is_dir()

    moved = tmp_path / "elsewhere"
    shutil.move(str(run), str(moved))  # the whole run folder moved
    assert read_model_dirs(moved)["rlhf"].is_dir()

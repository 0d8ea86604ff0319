"""`sae-train --out` and `save_sae` never replace what they did not write, and saved SAE folders
carry the sha256 of their files, checked by `load_sae`."""

import json

import pytest
import torch
from sae_lens import SAE
from safetensors.torch import save_file

from irmlens.errors import CorruptCacheError
from sae_training.cli import main
from sae_training.train import (
    SAETrainingConfig,
    TrainingInputError,
    check_output_dir,
    is_irmlens_sae_dir,
    load_sae,
    load_whitening,
    make_training_sae,
    save_sae,
)

HOOK = "blocks.1.hook_resid_post"


def _acts_file(folder, n=600, d=8, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "blocks.0.hook_resid_post.safetensors"
    g = torch.Generator().manual_seed(seed)
    save_file({"activations": torch.randn(n, d, generator=g)}, str(path))
    return path


def _train_args(acts, out, *extra):
    return [
        "--activations",
        str(acts),
        "--width",
        "2x",
        "--batch-size",
        "128",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--out",
        str(out),
        *extra,
    ]


def _snapshot(folder):
    """Every file under ``folder`` (relative path -> bytes), to compare before and after."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _refused(capsys, argv, message):
    capsys.readouterr()  # what earlier runs printed
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("sae-train: error: --out") and message in err, err
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, make_random_cache):
    out = tmp_path_factory.mktemp("run") / "cache"
    return make_random_cache(out, 40, 16, 16, 100, shard_rows=20)


def test_users_file_in_out_folder_survives(tmp_path, capsys):
    acts = _acts_file(tmp_path / "a")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    _refused(capsys, _train_args(acts, out), "not an SAE folder irmlens wrote")
    # 'mine/new/..' names 'mine' once 'new' exists (and writing would create it)
    _refused(capsys, _train_args(acts, out / "new" / ".."), "not an SAE folder irmlens wrote")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "my notes"
    # no .mine.old, no tmp, no lock file (sae-train removes its own when it ends)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "mine"]


def test_out_file_is_refused_and_left_unchanged(tmp_path, capsys):
    acts = _acts_file(tmp_path / "a")
    out = tmp_path / "results.txt"
    out.write_text("keep me")
    _refused(capsys, _train_args(acts, out), "is not a folder")
    assert out.read_text() == "keep me"
    assert not (tmp_path / ".results.txt.old").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "results.txt"]


def test_out_in_or_around_the_cache_is_refused_and_the_cache_is_unchanged(
    cache_dir, tmp_path, capsys
):
    before = _snapshot(cache_dir)
    shard = next((cache_dir / "base" / HOOK).glob("shard-*.safetensors"))
    base = ["--cache", str(cache_dir), "--model", "base", "--hook", HOOK, "--epochs", "1"]
    base += ["--batch-size", "64", "--device", "cpu"]
    for out, message in [
        (cache_dir / "base", "lies in the activation cache"),  # wiped the shards before
        (cache_dir / "base" / HOOK, "lies in the activation cache"),
        (cache_dir / "sae", "lies in the activation cache"),  # absent, but inside the cache
        (cache_dir, "is the activation cache"),
        (cache_dir.parent, "contains the training input"),
    ]:
        _refused(capsys, base + ["--out", str(out)], message)
        # the same through a relative path with '..' in it
        _refused(capsys, base + ["--out", str(out / "x" / "..")], message)
    # a shard given as an --activations file: its cache is protected too
    for out in (shard.parent / "sae", cache_dir / "sae"):
        _refused(capsys, _train_args(shard, out), "activation cache")
    assert not (cache_dir / "sae").exists()
    assert _snapshot(cache_dir) == before  # byte-identical


def test_out_next_to_the_cache_trains_and_retrains(cache_dir, tmp_path, capsys):
    out = tmp_path / "sae"
    argv = ["--cache", str(cache_dir), "--model", "base", "--hook", HOOK, "--width", "2x"]
    argv += ["--epochs", "1", "--batch-size", "64", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    assert is_irmlens_sae_dir(out)
    first = (out / "sae_weights.safetensors").read_bytes()
    assert main(argv + ["--seed", "1"]) == 0  # a re-train replaces our own folder
    assert (out / "sae_weights.safetensors").read_bytes() != first
    assert SAE.load_from_disk(str(out)).cfg.d_sae == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]  # no .sae.old left behind


def test_retraining_into_an_sae_train_folder_works(tmp_path, capsys):
    acts = _acts_file(tmp_path / "a")
    out = tmp_path / "sae"
    assert main(_train_args(acts, out)) == 0
    record = json.loads((out / "training.json").read_text())
    assert record["written_by"] == "irmlens sae_training"
    assert set(record["sha256"]) == {"cfg.json", "sae_weights.safetensors"}
    (out / "metrics.json").write_text("{}")  # what the pipeline's saes stage adds: still ours
    assert main(_train_args(acts, out, "--seed", "5")) == 0
    assert json.loads((out / "training.json").read_text())["training"]["seed"] == 5
    assert not (out / "metrics.json").exists()  # the re-train replaced the whole folder
    # a folder from irmlens before the marker: the SAELens files and training.json only
    del record["written_by"], record["sha256"]
    (out / "training.json").write_text(json.dumps(record))
    assert is_irmlens_sae_dir(out)
    assert main(_train_args(acts, out)) == 0
    # a file of the user's put into our folder: no longer only ours, refused and kept
    (out / "notes.txt").write_text("mine")
    _refused(capsys, _train_args(acts, out), "not an SAE folder irmlens wrote")
    assert (out / "notes.txt").read_text() == "mine" and (out / "cfg.json").exists()


def test_checkpoints_are_cleaned_up_but_a_users_folder_of_that_name_is_kept(tmp_path):
    acts = _acts_file(tmp_path / "a")
    assert main(_train_args(acts, tmp_path / "sae", "--checkpoints", "2")) == 0
    assert not (tmp_path / ".sae.checkpoints").exists()  # ours: removed after the final save
    user = tmp_path / ".other.checkpoints"
    user.mkdir()
    (user / "keep.txt").write_text("mine")
    assert main(_train_args(acts, tmp_path / "other", "--checkpoints", "2")) == 0
    assert [p.name for p in user.iterdir()] == ["keep.txt"]  # only what this run wrote is gone
    assert (user / "keep.txt").read_text() == "mine"


def _small_sae(**kw):
    cfg = SAETrainingConfig(width=32, batch_size=16, **kw)
    return make_training_sae(cfg, 16, 10, "blocks.0.hook_resid_post", "m")


def test_save_sae_itself_refuses_what_it_did_not_write(tmp_path):
    sae = _small_sae()
    out = tmp_path / "out"
    out.mkdir()
    (out / "data.csv").write_text("1,2")
    with pytest.raises(TrainingInputError, match="not an SAE folder irmlens wrote"):
        save_sae(sae, out)
    assert [p.name for p in out.iterdir()] == ["data.csv"]
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(TrainingInputError, match="is not a folder"):
        save_sae(sae, f)
    assert f.read_text() == "x" and not (tmp_path / ".file.old").exists()
    # a .<name>.old beside it is a user's as much as any file: the swap leaves it alone
    new = tmp_path / "new"
    save_sae(sae, new)
    old = tmp_path / ".new.old"
    old.mkdir()
    (old / "x.txt").write_text("x")
    save_sae(sae, new)
    assert (old / "x.txt").read_text() == "x"
    # the pipeline's re-train: its folder with training.json and metrics.json, or empty
    (new / "metrics.json").write_text("{}")
    (new / "cfg.json").unlink()  # the pipeline re-trains a folder missing its cfg.json
    check_output_dir(new)
    save_sae(sae, new)
    empty = tmp_path / "empty"
    empty.mkdir()
    save_sae(sae, empty)
    assert load_sae(empty).cfg.d_sae == 32


def test_flipped_byte_in_the_weights_is_caught_by_load_sae(tmp_path):
    sae = _small_sae()
    out = save_sae(sae, tmp_path / "sae", extra={"training": {"width": 32}})
    record = json.loads((out / "training.json").read_text())
    assert record["training"] == {"width": 32} and "sae_weights.safetensors" in record["sha256"]
    loaded = load_sae(out)  # unchanged: loads, and SAELens's own loader still reads the folder
    assert torch.equal(loaded.W_dec, sae.W_dec.detach())
    assert SAE.load_from_disk(str(out)).cfg.d_sae == 32
    weights = out / "sae_weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptCacheError, match="sae_weights.safetensors does not match") as e:
        load_sae(out)
    assert "delete" in str(e.value) and str(out) in str(e.value)
    # a missing file is named too
    weights.unlink()
    with pytest.raises(CorruptCacheError, match="sae_weights.safetensors is missing"):
        load_sae(out)


def test_whitening_file_is_checked_and_folders_without_checksums_load(tmp_path):
    sae = _small_sae()
    w = {"mean": torch.zeros(16), "matrix": torch.eye(16), "inverse_matrix": torch.eye(16)}
    out = save_sae(sae, tmp_path / "w", tensors={"whitening.safetensors": w})
    assert torch.equal(load_whitening(out)["matrix"], torch.eye(16))
    f = out / "whitening.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0x10
    f.write_bytes(bytes(data))
    with pytest.raises(CorruptCacheError, match="whitening.safetensors does not match"):
        load_whitening(out)
    with pytest.raises(CorruptCacheError, match="whitening.safetensors"):
        load_sae(out)
    # a plain SAELens folder (no training.json), or irmlens's from before the checksums
    plain = tmp_path / "plain"
    sae.save_inference_model(str(plain))
    assert load_sae(plain).cfg.d_sae == 32
    (plain / "training.json").write_text(json.dumps({"training": {}, "n_train_positions": 1}))
    assert load_sae(plain).cfg.d_sae == 32

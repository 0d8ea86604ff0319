"""RLHF and SAE checkpoints that fail to load are skipped with a warning or named with the fix,
never a raw UnpicklingError (issue 13)."""

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from irmlens.errors import DamagedFileError
from irmlens.io import sha256_file
from irmlens.rlhf.train import _latest_ppo_checkpoint, _load_checkpoint_tensors
from sae_training.train import _loadable_checkpoint


def _ppo_checkpoint(d, step):
    p = d / f"step-{step:06d}"
    (p / "policy").mkdir(parents=True)
    save_file({"w": torch.arange(4.0)}, str(p / "policy/model.safetensors"))
    torch.save({"state": {}}, p / "optimizer.pt")
    sha = {str(f.relative_to(p)): sha256_file(f) for f in sorted(p.rglob("*")) if f.is_file()}
    (p / "state.json").write_text(json.dumps({"step": step, "sha256": sha}))
    return p


def test_a_damaged_ppo_checkpoint_is_skipped_for_the_one_before(tmp_path):
    older, newer = _ppo_checkpoint(tmp_path, 2), _ppo_checkpoint(tmp_path, 4)
    assert _latest_ppo_checkpoint(tmp_path) == newer
    w = newer / "policy/model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"step-000004 is damaged \(policy/model.safetensors\)"):
        assert _latest_ppo_checkpoint(tmp_path) == older
    (older / "state.json").write_text('{"step": 2, "sha2')  # truncated record
    with pytest.warns(UserWarning, match="skipped"):
        assert _latest_ppo_checkpoint(tmp_path) is None  # training starts over


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_a_pickle_planted_in_a_checkpoint_is_refused_with_the_fix(tmp_path):
    p = tmp_path / "step-000002" / "optimizer.pt"
    p.parent.mkdir()
    p.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(
        DamagedFileError, match=r"cannot be loaded as a checkpoint.*delete .*step-000002"
    ):
        _load_checkpoint_tensors(p)


def test_an_unloadable_sae_checkpoint_is_skipped(tmp_path):
    good = tmp_path / "4096"
    good.mkdir()
    save_file({"W_enc": torch.zeros(2, 3)}, str(good / "sae_weights.safetensors"))
    torch.save({"n_training_samples": 4096}, good / "trainer_state.pt")
    assert _loadable_checkpoint(good)
    (good / "trainer_state.pt").write_bytes(pickle.dumps(_Evil()))
    with pytest.warns(UserWarning, match=r"SAE checkpoint .*4096 cannot be loaded.*skipped"):
        assert not _loadable_checkpoint(good)

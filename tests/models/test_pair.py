from types import SimpleNamespace

import pytest

from irmlens.errors import ModelPairError
from irmlens.models.pair import check_pair_configs


def test_pair_with_different_d_model_is_refused():
    a = SimpleNamespace(d_model=64, n_layers=2, d_vocab=100)
    b = SimpleNamespace(d_model=128, n_layers=2, d_vocab=100)
    check_pair_configs(a, a)
    with pytest.raises(ModelPairError, match="d_model.*64 vs 128"):
        check_pair_configs(a, b)


def _copy_with_changed_weight(src, dst):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    state = load_file(str(f))
    key = next(k for k in state if k.endswith("wte.weight"))
    state[key] = state[key] + 0.01
    save_file(state, str(f), metadata={"format": "pt"})
    return dst


def test_a_permuted_tokenizer_is_refused(tiny_hf_dir, tmp_path):
    """The same model with its token ids permuted: accepted before, it paired unrelated
    activations position by position and yielded a report full of 'RLHF features'."""
    import json

    from irmlens.models.pair import check_pair_folders

    rlhf = _copy_with_changed_weight(tiny_hf_dir, tmp_path / "rlhf")
    check_pair_folders({"base": tiny_hf_dir, "rlhf": rlhf})  # a real fine-tune passes
    tok = json.loads((rlhf / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[40:42]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (rlhf / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ModelPairError, match="another tokenizer.*vocabularies differ"):
        check_pair_folders({"base": tiny_hf_dir, "rlhf": rlhf})


def test_identical_weights_are_refused(tiny_hf_dir, tmp_path):
    """Base vs itself ran 218 s and then crashed on a NaN."""
    import shutil

    from irmlens.models.pair import check_pair_folders

    same = tmp_path / "same"
    shutil.copytree(tiny_hf_dir, same)
    with pytest.raises(ModelPairError, match="exactly the base model's weights"):
        check_pair_folders({"base": tiny_hf_dir, "rlhf": same})
    with pytest.raises(ModelPairError, match="model.null"):
        rlhf = _copy_with_changed_weight(tiny_hf_dir, tmp_path / "rlhf")
        check_pair_folders({"base": tiny_hf_dir, "rlhf": rlhf, "null": same})

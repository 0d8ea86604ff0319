"""Load local HF checkpoints as TransformerLens ``HookedTransformer`` models, offline.

``HookedTransformer.from_pretrained`` only accepts names from TransformerLens's official list (and
then needs the hub), so for local folders we build the config and state dict with TransformerLens's
own converters (``get_pretrained_model_config`` / ``get_pretrained_state_dict``) from an HF model we
loaded ourselves. Weights are loaded unprocessed (no LayerNorm folding, no centering) so that
activations equal HF's hidden states and weight deltas are the real parameter changes.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path

import torch

from irmlens.errors import ModelPairError


def load_hf_model(model_dir: str | Path, device: str = "cpu"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise ModelPairError(
            f"{model_dir} is not an HF model folder (no config.json). Give a folder written by "
            "`save_pretrained`, or run `irmlens pretrain` to build the embedded default."
        )
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    return hf, tok


@contextlib.contextmanager
def _config_dir_for_transformer_lens(model_dir: Path):
    """The folder TransformerLens should read ``config.json`` from. transformers 5 drops GPT-2's
    ``n_ctx`` on save and TransformerLens's converter needs it: then a temporary folder holding a
    patched copy of the config (TransformerLens takes the weights from the loaded HF model, so it
    reads nothing else there). The user's folder is never written to."""
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("model_type") != "gpt2" or "n_ctx" in cfg:
        yield model_dir
        return
    with tempfile.TemporaryDirectory(prefix="irmlens-config-") as tmp:
        folder = Path(tmp) / model_dir.name  # TransformerLens names the model after the folder
        folder.mkdir()
        cfg["n_ctx"] = cfg.get("n_positions", 1024)
        (folder / "config.json").write_text(json.dumps(cfg))
        yield folder


def load_hooked_model(model_dir: str | Path, device: str = "cpu", hf_model=None, tokenizer=None):
    """A ``HookedTransformer`` with the weights of the HF folder ``model_dir``."""
    from transformer_lens import HookedTransformer
    from transformer_lens.loading_from_pretrained import (
        get_pretrained_model_config,
        get_pretrained_state_dict,
    )

    model_dir = Path(model_dir)
    if hf_model is None or tokenizer is None:
        hf_model, tokenizer = load_hf_model(model_dir, device)
    with _config_dir_for_transformer_lens(model_dir) as config_dir:
        cfg = get_pretrained_model_config(str(config_dir), device=device, dtype=torch.float32)
        state = get_pretrained_state_dict(str(config_dir), cfg, hf_model=hf_model)
    model = HookedTransformer(cfg, tokenizer=tokenizer, default_padding_side="right")
    model.load_and_process_state_dict(
        state,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
    )
    return model.to(device).eval()

"""Load local HF checkpoints as TransformerLens ``HookedTransformer`` models, offline.

``HookedTransformer.from_pretrained`` only accepts names from TransformerLens's official list (and
then needs the hub), so for local folders we build the config and state dict with TransformerLens's
own converters (``get_pretrained_model_config`` / ``get_pretrained_state_dict``) from an HF model we
loaded ourselves. Weights are loaded unprocessed (no LayerNorm folding, no centering) so that
activations equal HF's hidden states and weight deltas are the real parameter changes.
"""

from __future__ import annotations

import json
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


def _ensure_n_ctx(model_dir: Path) -> None:
    """transformers 5 drops GPT-2's ``n_ctx`` on save; TransformerLens's converter needs it."""
    cfg_path = model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("model_type") == "gpt2" and "n_ctx" not in cfg:
        from irmlens.io import atomic_write_json

        cfg["n_ctx"] = cfg.get("n_positions", 1024)
        atomic_write_json(cfg_path, cfg)


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
    _ensure_n_ctx(model_dir)
    cfg = get_pretrained_model_config(str(model_dir), device=device, dtype=torch.float32)
    state = get_pretrained_state_dict(str(model_dir), cfg, hf_model=hf_model)
    model = HookedTransformer(cfg, tokenizer=tokenizer, default_padding_side="right")
    model.load_and_process_state_dict(
        state,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
    )
    return model.to(device).eval()

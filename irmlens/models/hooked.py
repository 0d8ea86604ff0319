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
import shutil
import tempfile
from pathlib import Path

import torch

from irmlens.errors import ModelPairError, RemoteCodeError

REMOTE_CODE_KEY = "model.trust_remote_code"
_CODE_FILES = ("config.json", "tokenizer_config.json")


def remote_code_entries(model_dir: str | Path) -> dict[str, dict]:
    """The ``auto_map`` entries of a model folder's config files: the classes it wants loaded
    from its own (or a hub repo's) Python files instead of transformers' built-in ones."""
    found = {}
    for name in _CODE_FILES:
        f = Path(model_dir) / name
        if f.exists():
            try:
                # utf-8-sig: a BOM must not hide an auto_map (the lexicon reader reads BOMs too)
                auto_map = json.loads(f.read_text(encoding="utf-8-sig")).get("auto_map")
            except (ValueError, UnicodeDecodeError, AttributeError):
                continue  # not ours to judge here: transformers names a broken file itself
            if auto_map:
                found[name] = auto_map
    return found


def check_remote_code(model_dir: str | Path, trust_remote_code: bool, key: str = "model") -> None:
    """Refuse a folder that would run its own Python code unless the config allows it."""
    entries = remote_code_entries(model_dir)
    if entries and not trust_remote_code:
        detail = "; ".join(f"{name}: auto_map {sorted(m)}" for name, m in entries.items())
        raise RemoteCodeError(
            f"{key} folder {model_dir} asks to run its own Python code ({detail}). irmlens runs "
            f"no code from a model folder unless you allow it: set {REMOTE_CODE_KEY} = true in "
            "the config if you trust this folder, or use a folder without auto_map."
        )


_PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth")


def check_weights_loadable(model_dir: str | Path, key: str = "model") -> None:
    """Refuse, before anything loads it, a folder whose weights are a pickle holding more than
    tensors. transformers reads ``.bin`` files with ``torch.load(weights_only=True)``, which
    refuses such a pickle with an ``UnpicklingError`` whose text suggests ``weights_only=False``,
    the very thing not to do with a file you did not make. Only checked where no safetensors file
    is there (transformers prefers those); the file is memory-mapped, not read whole."""
    import pickle

    folder = Path(model_dir)
    if any(folder.glob("*.safetensors")):
        return
    for f in sorted(p for pattern in _PICKLED_WEIGHTS for p in folder.glob(pattern)):
        if f.name.startswith("training_args"):
            continue  # trainer state, not weights: transformers never loads it as a model
        try:
            torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as e:
            lines = [ln.strip() for ln in str(e).splitlines() if "global" in ln.lower()]
            first = (lines[0] if lines else type(e).__name__)[:200]
            raise ModelPairError(
                f"{key}: {f} is a pickle that holds more than tensors ({first}). irmlens loads "
                "weights with torch.load(weights_only=True), which refuses it, because loading it "
                "in full could run code from the file. Convert the model to safetensors where it "
                "was made (`model.save_pretrained(folder)` writes model.safetensors), or use "
                "another folder."
            ) from None
        except RuntimeError:
            return  # not a zip pickle torch can map (an old format): transformers decides


def load_hf_model(model_dir: str | Path, device: str = "cpu", trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir).resolve()
    if not (model_dir / "config.json").exists():
        raise ModelPairError(
            f"{model_dir} is not an HF model folder (no config.json). Give a folder written by "
            "`save_pretrained`, or run `irmlens pretrain` to build the embedded default."
        )
    check_remote_code(model_dir, trust_remote_code)
    hf = (
        AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
        .to(device)
        .eval()
    )
    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    return hf, tok


@contextlib.contextmanager
def _config_dir_for_transformer_lens(model_dir: Path, trust_remote_code: bool = False):
    """The folder TransformerLens reads ``config.json`` from: always a temporary folder holding
    only a copy of the config, named like the user's folder (TransformerLens names the model
    after it). TransformerLens takes the weights from the HF model we loaded, so it needs
    nothing else, and:

    * it turns ``trust_remote_code`` on by itself for names that start like ``Qwen/Qwen-`` or
      ``microsoft/phi-2`` (a relative path of a folder can), so it must never see the user's
      folder, whose Python files would then run; the copy is absolute, holds no code and, unless
      the user allowed remote code, no ``auto_map``;
    * transformers 5 drops GPT-2's ``n_ctx`` on save and TransformerLens's converter needs it.

    The user's folder is never written to."""
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if cfg.get("model_type") == "gpt2" and "n_ctx" not in cfg:
        cfg["n_ctx"] = cfg.get("n_positions", 1024)
    if not trust_remote_code:
        cfg.pop("auto_map", None)
    with tempfile.TemporaryDirectory(prefix="irmlens-config-") as tmp:
        folder = Path(tmp).resolve() / model_dir.name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(cfg))
        if trust_remote_code:  # the user allowed the folder's code: its config classes with it
            for code in model_dir.glob("*.py"):
                shutil.copy2(code, folder / code.name)
        yield folder


def load_hooked_model(
    model_dir: str | Path,
    device: str = "cpu",
    hf_model=None,
    tokenizer=None,
    trust_remote_code: bool = False,
):
    """A ``HookedTransformer`` with the weights of the HF folder ``model_dir``. No Python file of
    the folder runs unless ``trust_remote_code`` (``model.trust_remote_code`` in a config)."""
    from transformer_lens import HookedTransformer
    from transformer_lens.loading_from_pretrained import (
        get_pretrained_model_config,
        get_pretrained_state_dict,
    )

    model_dir = Path(model_dir).resolve()
    check_remote_code(model_dir, trust_remote_code)
    if hf_model is None or tokenizer is None:
        hf_model, tokenizer = load_hf_model(model_dir, device, trust_remote_code)
    with _config_dir_for_transformer_lens(model_dir, trust_remote_code) as config_dir:
        kw = {"trust_remote_code": trust_remote_code}
        cfg = get_pretrained_model_config(str(config_dir), device=device, dtype=torch.float32, **kw)
        state = get_pretrained_state_dict(str(config_dir), cfg, hf_model=hf_model, **kw)
    model = HookedTransformer(cfg, tokenizer=tokenizer, default_padding_side="right")
    model.load_and_process_state_dict(
        state,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
    )
    return model.to(device).eval()

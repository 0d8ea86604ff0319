"""On-disk paired activation cache (simple form): one safetensors file per model and hook.

Layout under ``<run>/cache/``::

    tokens.safetensors        tokens, valid, word_id  (shared by both models)
    words.json                word strings indexed by word_id
    <model>/<hook>.safetensors   "activations": [n_valid_positions, d_model] float32,
                                  rows in row-major order of ``valid``
    manifest.json             shapes, dtypes, sha256 per file, model identities, layers

The manifest is written last, so a cache without one is incomplete and gets rebuilt.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from irmlens.io import atomic_write_json, read_json, sha256_file

MANIFEST = "manifest.json"


def hook_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def activation_path(cache_dir: str | Path, model: str, hook: str) -> Path:
    return Path(cache_dir) / model / f"{hook}.safetensors"


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)


def load_manifest(cache_dir: str | Path) -> dict | None:
    p = Path(cache_dir) / MANIFEST
    return read_json(p) if p.exists() else None


def cache_is_complete(cache_dir: str | Path, verify: bool = True) -> bool:
    """True when the manifest exists and every file it lists is present (and matches its sha256)."""
    manifest = load_manifest(cache_dir)
    if manifest is None:
        return False
    for rel, info in manifest["files"].items():
        p = Path(cache_dir) / rel
        if not p.exists() or (verify and sha256_file(p) != info["sha256"]):
            return False
    return True


def write_manifest(cache_dir: str | Path, meta: dict) -> dict:
    cache_dir = Path(cache_dir)
    files = {}
    for p in sorted(cache_dir.rglob("*.safetensors")):
        rel = str(p.relative_to(cache_dir))
        files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    manifest = {"format": "irmlens-activations-v0", **meta, "files": files}
    atomic_write_json(cache_dir / MANIFEST, manifest)
    return manifest


def load_activations(cache_dir: str | Path, model: str, hook: str) -> torch.Tensor:
    """``[n_valid_positions, d_model]`` activations of ``model`` at ``hook``."""
    path = activation_path(cache_dir, model, hook)
    if not path.exists():
        raise FileNotFoundError(
            f"no cached activations for model {model!r} at {hook} in {cache_dir}; "
            "run the cache stage (`irmlens run CONFIG`) first"
        )
    return load_file(str(path))["activations"]


def load_token_rows(cache_dir: str | Path):
    from irmlens.cache.tokens import TokenRows

    t = load_file(str(Path(cache_dir) / "tokens.safetensors"))
    words = read_json(Path(cache_dir) / "words.json")
    return TokenRows(t["tokens"], t["valid"].bool(), t["word_id"], words)

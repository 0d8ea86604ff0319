"""A base/RLHF model pair: compatibility checks and the pair.json that records what was compared."""

from __future__ import annotations

from pathlib import Path

from irmlens.errors import ModelPairError
from irmlens.io import atomic_write_json, sha256_file


def check_pair_configs(base_cfg, rlhf_cfg) -> None:
    """Refuse pairs whose residual streams cannot be compared position by position."""
    for attr in ("d_model", "n_layers", "d_vocab"):
        a, b = getattr(base_cfg, attr), getattr(rlhf_cfg, attr)
        if a != b:
            raise ModelPairError(
                f"base and RLHF models differ in {attr} ({a} vs {b}): they are not a model pair. "
                "The RLHF model must be a fine-tune of the base model (same architecture and tokenizer)."
            )


def _weights_hash(model_dir: Path) -> str | None:
    files = sorted(model_dir.glob("*.safetensors"))
    return sha256_file(files[0])[:16] if len(files) == 1 else None


def write_pair_json(
    path: str | Path, base_dir: str | Path, rlhf_dir: str | Path, extra: dict
) -> dict:
    base_dir, rlhf_dir = Path(base_dir), Path(rlhf_dir)
    info = {
        "base": {"path": str(base_dir), "weights_sha256_16": _weights_hash(base_dir)},
        "rlhf": {"path": str(rlhf_dir), "weights_sha256_16": _weights_hash(rlhf_dir)},
        **extra,
    }
    atomic_write_json(path, info)
    return info

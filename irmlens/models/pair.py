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


def _tokenizer_facts(model_dir: Path, trust_remote_code: bool = False) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    special = {
        name: getattr(tok, name, None)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
    }
    return {"vocab": tok.get_vocab(), "special": special}


def _same_weights(a: Path, b: Path) -> bool | None:
    """Whether two HF folders hold bit-identical weights (None: not safetensors, not compared).
    Compared tensor by tensor, so two saves of the same weights count as the same."""
    from safetensors import safe_open

    fa, fb = sorted(a.glob("*.safetensors")), sorted(b.glob("*.safetensors"))
    if not fa or not fb:
        return None

    def tensors(files):
        handles = [safe_open(str(f), framework="pt") for f in files]
        return {k: h for h in handles for k in h.keys()}  # noqa: SIM118 (safe_open has no iter)

    ta, tb = tensors(fa), tensors(fb)
    if set(ta) != set(tb):
        return False
    import torch

    return all(torch.equal(ta[k].get_tensor(k), tb[k].get_tensor(k)) for k in ta)


def check_pair_folders(dirs: dict[str, Path], trust_remote_code: bool = False) -> None:
    """Refuse, before any work, a pair whose positions cannot be compared or that has nothing to
    compare: every model must read text with the base's tokenizer (same vocabulary, same ids,
    same special tokens; a permuted vocabulary would pair unrelated activations position by
    position), and must not hold the base's very weights (no change: every difference is zero)."""
    base = _tokenizer_facts(dirs["base"], trust_remote_code)
    for name, d in dirs.items():
        if name == "base":
            continue
        other = _tokenizer_facts(d, trust_remote_code)
        if other["vocab"] != base["vocab"]:
            diff = sorted(
                set(base["vocab"].items()) ^ set(other["vocab"].items()), key=lambda kv: kv[1]
            )[:3]
            raise ModelPairError(
                f"model.{name} ({d}) has another tokenizer than the base model ({dirs['base']}): "
                f"vocabularies differ (e.g. {diff}). The two must be the same model before and "
                "after fine-tuning, with the base's tokenizer (save it into the fine-tuned folder)."
            )
        special = dict(other["special"])
        if base["special"]["pad_token_id"] is None:
            # RLHF needs a pad token: irmlens's trainer (like most) sets it to EOS on the saved
            # copy, which changes no token id the models read
            special["pad_token_id"] = None
        if special != base["special"]:
            raise ModelPairError(
                f"model.{name} ({d}) has other special tokens than the base model: "
                f"{other['special']} vs {base['special']}. Save the base's tokenizer with it."
            )
        if _same_weights(dirs["base"], d):
            raise ModelPairError(
                f"model.{name} ({d}) has exactly the base model's weights ({dirs['base']}): there "
                "is no change to study, every activation difference would be zero. Give the "
                f"model after fine-tuning, or leave model.{name} empty to let irmlens train it."
            )

"""On-disk paired activation cache: shards (safetensors) per model and hook, verified by sha256.

Layout under ``<run>/cache/``::

    tokens.safetensors             tokens, valid, word_id (shared by every model and hook)
    words.json                     word strings indexed by word_id
    <model>/<hook>/shard-00000.safetensors ...
                                   "activations" [n, d] (bfloat16 / float32), or for int8
                                   "q" [n, d] int8 + "scale" [n] float32 (x ~ q * scale);
                                   "stat_sum" [d] and "stat_sum_norm" [] float64: the shard's
                                   column sums and sum of row norms (running statistics)
    <model>/token_logprobs/shard-00000.safetensors ...
                                   "logprob" [rows, n_ctx] float32: log p(t_i | t_<i) of every
                                   token of the shard's rows (0 at position 0), from the same
                                   float32 forward (for the models in the manifest's
                                   "token_logprobs" list)
    progress.json                  shards finished so far, with their sha256
    manifest.json                  written last: the cache is complete and may be used

Shard ``k`` holds the valid positions (row-major) of token rows ``[k*R, (k+1)*R)``, so the
concatenation of a model's shards is aligned position by position with every other model's.
An interrupted run resumes at the first shard missing from ``progress.json`` or whose checksum
fails; nothing is used that does not verify.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from irmlens.cache.kernels import encode_reference
from irmlens.errors import CorruptCacheError
from irmlens.io import atomic_write_json, read_json, sha256_file

MANIFEST = "manifest.json"
PROGRESS = "progress.json"
FORMAT = "irmlens-activations-v1"
DTYPES = ("bfloat16", "float32", "int8")
TOKEN_LOGPROBS = "token_logprobs"  # the per-token log-prob shards' folder, beside the hooks'
HOOK_KINDS = {"resid_post": "hook_resid_post", "mlp_out": "hook_mlp_out"}

STAT_SUM, STAT_SUM_NORM = "stat_sum", "stat_sum_norm"

# Worst-case error of the stored value, per element (|x| is the element, max|row| its row's max),
# relative to the activations the forward pass produced (on a GPU that forward runs under bf16
# autocast: the manifest's "forward" says which)
ERROR_BOUNDS = {
    "float32": "exact",
    "bfloat16": "relative 2^-8 of |x| (round-to-nearest to 8 significant bits)",
    "int8": "absolute max|row| / 254 (per-row scale max|row|/127, round-to-nearest)",
}


def hook_kind(hook: str | None) -> str:
    """``blocks.3.hook_mlp_out`` -> ``mlp_out``; no hook (a file written before hook kinds were
    recorded) -> ``resid_post``, the only kind those studied."""
    return hook.rsplit(".hook_", 1)[-1] if hook else "resid_post"


def hook_name(layer: int, kind: str = "resid_post") -> str:
    if kind not in HOOK_KINDS:
        raise ValueError(f"unknown hook kind {kind!r}; choose one of {sorted(HOOK_KINDS)}")
    return f"blocks.{layer}.{HOOK_KINDS[kind]}"


def shard_path(cache_dir: str | Path, model: str, hook: str, index: int) -> Path:
    return Path(cache_dir) / model / hook / f"shard-{index:05d}.safetensors"


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8: ``x ~ q * scale`` with ``|x - q*scale| <= max|row| / 254``."""
    tensors = encode_shard(x, "int8")
    return tensors["q"], tensors["scale"]


def encode_shard(x: torch.Tensor, dtype: str) -> dict[str, torch.Tensor]:
    """Storage encoding of activation rows (the torch definition the fused kernel matches)."""
    return encode_reference(x, dtype)[0]


def decode_shard(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    if "q" in tensors:
        return tensors["q"].float() * tensors["scale"][:, None]
    return tensors["activations"].float()


def load_manifest(cache_dir: str | Path) -> dict | None:
    p = Path(cache_dir) / MANIFEST
    return read_json(p) if p.exists() else None


def load_progress(cache_dir: str | Path, name: str = PROGRESS) -> dict:
    p = Path(cache_dir) / name
    return read_json(p) if p.exists() else {"shards": {}}


def rank_progress(rank: int) -> str:
    """The progress file of data-parallel rank ``rank`` (merged into PROGRESS at the end)."""
    return f"progress.rank{rank}.json"


def shard_verified(
    cache_dir: str | Path, progress: dict, k: int, models: list[str], hooks: list[str]
) -> bool:
    """Whether shard ``k`` is complete for every model and hook and matches its sha256."""
    for model in models:
        for hook in hooks:
            info = progress.get(f"{model}/{hook}/{k}")
            p = shard_path(cache_dir, model, hook, k)
            if info is None or not p.exists() or sha256_file(p) != info["sha256"]:
                return False
    return True


def cache_is_complete(cache_dir: str | Path, verify: bool = True) -> bool:
    """True when the manifest exists and every shard it lists is present (and matches its sha256)."""
    manifest = load_manifest(cache_dir)
    if manifest is None or manifest.get("format") != FORMAT:
        return False
    for rel, info in manifest["files"].items():
        p = Path(cache_dir) / rel
        if not p.exists() or (verify and sha256_file(p) != info["sha256"]):
            return False
    return True


def _require_manifest(cache_dir: str | Path) -> dict:
    manifest = load_manifest(cache_dir)
    if manifest is None:
        raise FileNotFoundError(
            f"{cache_dir} holds no complete activation cache (no {MANIFEST}); "
            "run the cache stage (`irmlens cache CONFIG` or `irmlens run CONFIG`) first"
        )
    return manifest


def load_activations(
    cache_dir: str | Path, model: str, hook: str, verify: bool = False
) -> torch.Tensor:
    """All ``[n_valid_positions, d_model]`` activations of ``model`` at ``hook``, as float32.

    ``verify`` checks each shard against the manifest's sha256 first (entry points that did not
    verify the cache themselves, such as ``sae-train --cache``, pass it)."""
    manifest = _require_manifest(cache_dir)
    if model not in manifest["models"] or hook not in manifest["hooks"]:
        raise FileNotFoundError(
            f"the cache in {cache_dir} has models {manifest['models']} and hooks {manifest['hooks']}, "
            f"not {model!r} at {hook!r}"
        )
    parts = []
    for k in range(manifest["n_shards"]):
        path = shard_path(cache_dir, model, hook, k)
        if verify:
            _verify_file(cache_dir, manifest, path)
        parts.append(decode_shard(load_file(str(path))))
    return torch.cat(parts)


def _verify_file(cache_dir: str | Path, manifest: dict, path: Path) -> None:
    """Raise CorruptCacheError unless ``path`` matches its sha256 in the manifest."""
    if sha256_file(path) != manifest["files"][str(path.relative_to(cache_dir))]["sha256"]:
        raise CorruptCacheError(
            f"{path} does not match its sha256 in {Path(cache_dir) / MANIFEST}: the cache is "
            "damaged; rerun the cache stage (it rewrites failing shards)"
        )


def load_token_logprobs(cache_dir: str | Path, model: str) -> torch.Tensor | None:
    """``[n_rows, n_ctx]`` log p(t_i | t_<i) of ``model`` on the cached token rows (verified
    against the manifest), or None where the cache did not record them (a bf16 forward, or a
    cache written before they were)."""
    manifest = _require_manifest(cache_dir)
    if model not in manifest.get(TOKEN_LOGPROBS, []):
        return None
    parts = []
    for k in range(manifest["n_shards"]):
        path = shard_path(cache_dir, model, TOKEN_LOGPROBS, k)
        _verify_file(cache_dir, manifest, path)
        parts.append(load_file(str(path))["logprob"])
    return torch.cat(parts)


def shard_statistics(
    cache_dir: str | Path, model: str, hook: str, index: int
) -> tuple[torch.Tensor, float]:
    """A shard's column sums and sum of row norms, stored in the shard itself."""
    with safe_open(str(shard_path(cache_dir, model, hook, index)), "pt") as f:
        return f.get_tensor(STAT_SUM), float(f.get_tensor(STAT_SUM_NORM))


def hook_statistics(cache_dir: str | Path, model: str, hook: str) -> dict:
    """Running statistics of a hook (mean vector, mean norm), e.g. for SAE input normalisation."""
    return _require_manifest(cache_dir)["statistics"][f"{model}/{hook}"]


def stream_batches(
    cache_dir: str | Path,
    model: str,
    hook: str,
    batch_size: int,
    seed: int = 0,
    shards_in_buffer: int = 4,
    epochs: int | None = 1,
) -> Iterator[torch.Tensor]:
    """Shuffled float32 batches read shard by shard: only ``shards_in_buffer`` shards in memory.

    Shard order is shuffled each epoch and rows are shuffled inside the buffer, deterministically
    under ``seed``. ``epochs=None`` streams forever.
    """
    manifest = _require_manifest(cache_dir)
    gen = torch.Generator().manual_seed(seed)
    epoch = 0
    leftover = None
    while epochs is None or epoch < epochs:
        order = torch.randperm(manifest["n_shards"], generator=gen).tolist()
        for i in range(0, len(order), shards_in_buffer):
            parts = [
                decode_shard(load_file(str(shard_path(cache_dir, model, hook, k))))
                for k in order[i : i + shards_in_buffer]
            ]
            if leftover is not None:
                parts.insert(0, leftover)
            buf = torch.cat(parts)
            buf = buf[torch.randperm(len(buf), generator=gen)]
            n_full = len(buf) // batch_size * batch_size
            for j in range(0, n_full, batch_size):
                yield buf[j : j + batch_size]
            leftover = buf[n_full:] if n_full < len(buf) else None
        epoch += 1


def load_token_rows(cache_dir: str | Path):
    from irmlens.cache.tokens import TokenRows

    t = load_file(str(Path(cache_dir) / "tokens.safetensors"))
    words = read_json(Path(cache_dir) / "words.json")
    in_word = t["in_word"].bool() if "in_word" in t else None
    return TokenRows(t["tokens"], t["valid"].bool(), t["word_id"], words, in_word)


def write_progress(cache_dir: str | Path, progress: dict, name: str = PROGRESS) -> None:
    atomic_write_json(Path(cache_dir) / name, progress)

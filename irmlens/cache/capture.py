"""Capture ``hook_resid_post`` of both models on the same token rows, stopping after the last needed layer."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from irmlens.cache.store import activation_path, hook_name, save_tensors_atomic, write_manifest
from irmlens.cache.tokens import TokenRows


@torch.no_grad()
def capture_residuals(
    model, rows: TokenRows, layers: list[int], batch_size: int = 32, desc: str = "cache"
) -> dict[str, torch.Tensor]:
    """``{hook: [n_valid, d_model]}`` for one HookedTransformer; BOS and padding are dropped."""
    hooks = [hook_name(layer) for layer in layers]
    stop = max(layers) + 1
    chunks: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    device = next(model.parameters()).device
    for i in tqdm(range(0, len(rows.tokens), batch_size), desc=desc, unit="batch"):
        toks = rows.tokens[i : i + batch_size].to(device)
        mask = rows.valid[i : i + batch_size]
        _, cache = model.run_with_cache(toks, names_filter=hooks, stop_at_layer=stop)
        for h in hooks:
            chunks[h].append(cache[h].float().cpu()[mask])
    return {h: torch.cat(v) for h, v in chunks.items()}


def build_paired_cache(
    models: dict[str, object],
    rows: TokenRows,
    layers: list[int],
    cache_dir: str | Path,
    meta: dict,
    batch_size: int = 32,
) -> dict:
    """Write tokens, every model's activations and (last) the manifest."""
    from irmlens.io import atomic_write_json

    cache_dir = Path(cache_dir)
    save_tensors_atomic(
        cache_dir / "tokens.safetensors",
        {"tokens": rows.tokens, "valid": rows.valid.to(torch.uint8), "word_id": rows.word_id},
    )
    atomic_write_json(cache_dir / "words.json", rows.words)
    shapes = {}
    for name, model in models.items():
        acts = capture_residuals(model, rows, layers, batch_size, desc=f"cache {name}")
        for hook, tensor in acts.items():
            save_tensors_atomic(activation_path(cache_dir, name, hook), {"activations": tensor})
            shapes[f"{name}/{hook}"] = list(tensor.shape)
    return write_manifest(
        cache_dir,
        {
            **meta,
            "layers": layers,
            "hooks": [hook_name(layer) for layer in layers],
            "models": list(models),
            "dtype": "float32",
            "n_rows": int(rows.tokens.shape[0]),
            "n_ctx": int(rows.tokens.shape[1]),
            "n_valid_positions": int(rows.valid.sum()),
            "shapes": shapes,
        },
    )

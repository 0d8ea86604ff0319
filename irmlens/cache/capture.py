"""Capture hooks of several models on the same token rows into a sharded, resumable cache.

Both models see exactly the same token batches; only the chosen hooks are kept and the forward
pass stops after the last needed layer, unless the token log-probs are recorded too
(``token_logprobs``: the target stage's implicit reward then needs no second forward pass over
the same tokens). BOS and padding positions are dropped (``rows.valid``).
On a GPU the forward runs under bf16 autocast and activations are copied to pinned host memory
with non-blocking copies; on a CPU it runs in float32. Shards are cast (or int8-quantised) after
the running statistics are accumulated from the float32 values, so statistics are the same
whatever the storage dtype.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from irmlens.cache.kernels import encode_with_statistics
from irmlens.cache.store import (
    DTYPES,
    ERROR_BOUNDS,
    FORMAT,
    PROGRESS,
    STAT_SUM,
    STAT_SUM_NORM,
    TOKEN_LOGPROBS,
    hook_name,
    load_manifest,
    load_progress,
    rank_progress,
    save_tensors_atomic,
    shard_path,
    shard_statistics,
    shard_verified,
    write_progress,
)
from irmlens.cache.tokens import TokenRows
from irmlens.errors import ConfigError
from irmlens.io import atomic_write_json, sha256_file


def next_token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log p(t_i | t_<i)`` per position (``[batch, n_ctx]`` float32, 0 at position 0) from a
    forward pass's ``[batch, n_ctx, d_vocab]`` logits over ``tokens``."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    lp = logp[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    return torch.cat([torch.zeros_like(lp[:, :1]), lp], dim=1)


def _hook_batches(
    model,
    tokens: torch.Tensor,
    valid: torch.Tensor,
    hooks: list[str],
    batch_size: int,
    logprobs: bool = False,
):
    """Per token batch, ``({hook: activations at the valid positions}, token log-probs or None)``
    on the model's device. Without ``logprobs`` the forward stops after the last needed layer;
    with it the forward runs to the logits and the second item is ``log p(t_i | t_<i)``
    (``next_token_logprobs``). Under bf16 autocast on CUDA."""
    stop = None if logprobs else max(int(h.split(".")[1]) for h in hooks) + 1
    device = next(model.parameters()).device
    on_gpu = device.type == "cuda"
    for i in range(0, len(tokens), batch_size):
        toks = tokens[i : i + batch_size].to(device, non_blocking=on_gpu)
        mask = valid[i : i + batch_size].to(device, non_blocking=on_gpu)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
            out, cache = model.run_with_cache(toks, names_filter=hooks, stop_at_layer=stop)
        lp = next_token_logprobs(out, toks) if logprobs else None
        yield {h: cache[h][mask] for h in hooks}, lp


@torch.no_grad()
def capture_hooks(
    model, tokens: torch.Tensor, valid: torch.Tensor, hooks: list[str], batch_size: int = 32
) -> dict[str, torch.Tensor]:
    """``{hook: [n_valid, d]}`` float32 for one HookedTransformer on ``tokens`` (rows), valid positions only."""
    device = next(model.parameters()).device
    on_gpu = device.type == "cuda"
    chunks: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    for batch, _ in _hook_batches(model, tokens, valid, hooks, batch_size):
        for h, sel in batch.items():
            if on_gpu:
                host = torch.empty(sel.shape, dtype=sel.dtype, pin_memory=True)
                host.copy_(sel, non_blocking=True)
                chunks[h].append(host)
            else:
                chunks[h].append(sel.float())
    if on_gpu:
        torch.cuda.synchronize(device)
    return {h: torch.cat(v).float() for h, v in chunks.items()}


@torch.no_grad()
def capture_encoded(
    model,
    tokens: torch.Tensor,
    valid: torch.Tensor,
    hooks: list[str],
    batch_size: int,
    dtype: str,
    logprobs: list[torch.Tensor] | None = None,
) -> dict[str, tuple[dict[str, torch.Tensor], torch.Tensor, float]]:
    """Per hook: (encoded shard tensors on the host, float64 column sum, sum of row norms).
    Given a list as ``logprobs``, the forward runs to the logits and each batch's token log-probs
    (``_hook_batches``) are appended to it, on the host.

    Encoding and statistics run where the activations are (the fused Triton kernel on CUDA, its
    torch reference on CPU). On CUDA the encoded batch is copied to pinned host memory on a side
    stream, so the copy overlaps the next batch's forward pass.
    """
    device = next(model.parameters()).device
    on_gpu = device.type == "cuda"
    copy_stream = torch.cuda.Stream(device) if on_gpu else None
    parts: dict[str, dict[str, list[torch.Tensor]]] = {h: {} for h in hooks}
    col_sums: dict[str, torch.Tensor] = {}
    norm_sums: dict[str, torch.Tensor] = {}
    batches = _hook_batches(model, tokens, valid, hooks, batch_size, logprobs is not None)
    for batch, lp in batches:
        if logprobs is not None:
            logprobs.append(lp.cpu())
        for h, sel in batch.items():
            tensors, col_sum, norm_sum = encode_with_statistics(sel, dtype)
            col_sums[h] = col_sum.double() + col_sums.get(h, 0.0)
            norm_sums[h] = norm_sum.double() + norm_sums.get(h, 0.0)
            for key, t in tensors.items():
                if on_gpu:
                    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                    copy_stream.wait_stream(torch.cuda.current_stream(device))
                    with torch.cuda.stream(copy_stream):
                        host.copy_(t, non_blocking=True)
                    t.record_stream(copy_stream)
                    t = host
                parts[h].setdefault(key, []).append(t)
    if on_gpu:
        torch.cuda.synchronize(device)
    return {
        h: (
            {k: torch.cat(v) for k, v in parts[h].items()},
            col_sums[h].cpu(),
            float(norm_sums[h]),
        )
        for h in hooks
    }


def capture_residuals(model, rows: TokenRows, layers: list[int], batch_size: int = 32):
    """``{hook_resid_post: [n_valid, d]}`` float32 for the given layers (in-memory, no files)."""
    return capture_hooks(
        model, rows.tokens, rows.valid, [hook_name(layer) for layer in layers], batch_size
    )


def _write_tokens(cache_dir: Path, rows: TokenRows) -> str:
    """Write the shared token rows; their sha256 ties every shard to these exact tokens."""
    path = cache_dir / "tokens.safetensors"
    tensors = {"tokens": rows.tokens, "valid": rows.valid.to(torch.uint8), "word_id": rows.word_id}
    if rows.in_word is not None:
        tensors["in_word"] = rows.in_word.to(torch.uint8)
    save_tensors_atomic(path, tensors)
    atomic_write_json(cache_dir / "words.json", rows.words)
    return sha256_file(path)


def build_paired_cache(
    models: dict[str, object],
    rows: TokenRows,
    layers: list[int],
    cache_dir: str | Path,
    meta: dict,
    batch_size: int = 32,
    hook_kinds: tuple[str, ...] = ("resid_post",),
    dtype: str = "bfloat16",
    shard_rows: int = 256,
    token_logprobs: tuple[str, ...] = (),
) -> dict:
    """Write (or resume) every model's shards, then the manifest. Returns the manifest.

    ``token_logprobs``: the models that also store their log-prob of every token
    (``TOKEN_LOGPROBS`` shards, one [rows, n_ctx] float32 tensor each), from the same forward
    pass (the others' forward still stops after the last needed layer). Only a float32
    forward records them: a bf16-autocast forward (CUDA) would put rounding noise the size of
    the models' difference into their log-ratio, so there the target stage runs its own float32
    pass."""
    if dtype not in DTYPES:
        raise ValueError(f"cache dtype {dtype!r}; choose one of {DTYPES}")
    if len(rows.tokens) == 0 or not bool(rows.valid.any()):
        raise ConfigError(
            "the text to cache gave no token positions: check the held-out reviews "
            "(data.n_heldout) and cache.max_rows"
        )
    dist, rank, world = _distributed()
    cache_dir = Path(cache_dir)
    if rank == 0:
        cache_dir.mkdir(parents=True, exist_ok=True)
        (cache_dir / "manifest.json").unlink(missing_ok=True)
        _write_tokens(cache_dir, rows)
    if dist is not None:
        dist.barrier()  # the tokens are written before any rank reads their sha256
    hooks = [hook_name(layer, kind) for layer in layers for kind in hook_kinds]
    names = list(models)
    tokens_sha = sha256_file(cache_dir / "tokens.safetensors")
    forward = {
        name: "bfloat16 autocast" if next(m.parameters()).device.type == "cuda" else "float32"
        for name, m in models.items()
    }
    token_logprobs = [n for n in models if n in token_logprobs and forward[n] == "float32"]
    settings = {
        "tokens_sha256": tokens_sha,
        "hooks": hooks,
        "models": names,
        "dtype": dtype,
        "shard_rows": shard_rows,
        # the forward's precision (capture_encoded autocasts on CUDA): part of the settings, so a
        # cache begun on a CPU and resumed on a GPU starts over instead of mixing precisions
        "forward": forward,
        "token_logprobs": token_logprobs,
    }
    # one progress file per rank under torchrun (merged by rank 0 at the end); shards of an
    # earlier run, whatever its number of processes, count wherever they verify
    own = PROGRESS if world == 1 else rank_progress(rank)
    progress = load_progress(cache_dir)
    if progress.get("settings") != settings:  # different tokens or layout: start over
        progress = {"settings": settings, "shards": {}}
    mine = load_progress(cache_dir, own) if own != PROGRESS else {}
    if mine.get("settings") == settings:
        progress["shards"] |= mine["shards"]
    write_progress(cache_dir, progress, own)
    n_rows = len(rows.tokens)
    n_shards = math.ceil(n_rows / shard_rows)
    done = progress["shards"]
    todo = [
        k
        for k in range(rank, n_shards, world)  # this rank's slice of the shards
        if not (
            shard_verified(cache_dir, done, k, names, hooks)
            and shard_verified(cache_dir, done, k, token_logprobs, [TOKEN_LOGPROBS])
        )
    ]
    for k in tqdm(todo, desc="cache shards", unit="shard", disable=rank != 0):
        sl = slice(k * shard_rows, min((k + 1) * shard_rows, n_rows))
        for name, model in models.items():
            logprobs: list[torch.Tensor] | None = [] if name in token_logprobs else None
            encoded = capture_encoded(
                model, rows.tokens[sl], rows.valid[sl], hooks, batch_size, dtype, logprobs
            )
            if logprobs is not None:
                path = shard_path(cache_dir, name, TOKEN_LOGPROBS, k)
                save_tensors_atomic(path, {"logprob": torch.cat(logprobs)})
                key = f"{name}/{TOKEN_LOGPROBS}/{k}"
                progress["shards"][key] = {"sha256": sha256_file(path), "n": sl.stop - sl.start}
            for hook, (tensors, col_sum, norm_sum) in encoded.items():
                path = shard_path(cache_dir, name, hook, k)
                n = int(next(iter(tensors.values())).shape[0])
                # the shard's running statistics travel inside it (covered by its sha256):
                # progress.json, rewritten after every shard, stays small
                stats = {
                    STAT_SUM: col_sum.to(torch.float64),
                    STAT_SUM_NORM: torch.tensor(float(norm_sum), dtype=torch.float64),
                }
                save_tensors_atomic(path, {**tensors, **stats})
                progress["shards"][f"{name}/{hook}/{k}"] = {"sha256": sha256_file(path), "n": n}
                write_progress(cache_dir, progress, own)
    if dist is None:
        return _write_manifest(cache_dir, progress, n_shards, rows, layers, meta, settings)
    dist.barrier()  # every rank's shards are written
    if rank == 0:  # one progress file and one manifest, each written whole
        for r in range(1, world):
            progress["shards"] |= load_progress(cache_dir, rank_progress(r))["shards"]
        write_progress(cache_dir, progress)
        _write_manifest(cache_dir, progress, n_shards, rows, layers, meta, settings)
        for r in range(world):
            (cache_dir / rank_progress(r)).unlink(missing_ok=True)
    dist.barrier()
    return load_manifest(cache_dir)


def _distributed():
    """(torch.distributed, rank, world size) under ``torchrun``; (None, 0, 1) otherwise: each
    rank caches every world-th shard, from the same token rows, into its own files."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist, dist.get_rank(), dist.get_world_size()
    return None, 0, 1


def _write_manifest(cache_dir, progress, n_shards, rows, layers, meta, settings) -> dict:
    files = {"tokens.safetensors": {"sha256": settings["tokens_sha256"]}}
    statistics, shapes = {}, {}
    for name in settings["models"]:
        for hook in settings["hooks"]:
            n, total, norm = 0, None, 0.0
            for k in range(n_shards):
                info = progress["shards"][f"{name}/{hook}/{k}"]
                files[str(shard_path(cache_dir, name, hook, k).relative_to(cache_dir))] = {
                    "sha256": info["sha256"],
                    "n": info["n"],
                }
                n += info["n"]
                s, s_norm = shard_statistics(cache_dir, name, hook, k)
                total = s if total is None else total + s
                norm += s_norm
            statistics[f"{name}/{hook}"] = {
                "n": n,
                "mean": (total / n).tolist(),
                "mean_norm": norm / n,
            }
            shapes[f"{name}/{hook}"] = [n, len(total)]
        if name in settings["token_logprobs"]:
            for k in range(n_shards):
                info = progress["shards"][f"{name}/{TOKEN_LOGPROBS}/{k}"]
                rel = shard_path(cache_dir, name, TOKEN_LOGPROBS, k).relative_to(cache_dir)
                files[str(rel)] = {"sha256": info["sha256"], "n": info["n"]}
    manifest = {
        "format": FORMAT,
        **meta,
        "models": settings["models"],
        "hooks": settings["hooks"],
        "layers": layers,
        "dtype": settings["dtype"],
        "forward": settings["forward"],
        "token_logprobs": settings["token_logprobs"],
        "error_bound": ERROR_BOUNDS[settings["dtype"]],
        "n_shards": n_shards,
        "shard_rows": settings["shard_rows"],
        "n_rows": int(rows.tokens.shape[0]),
        "n_ctx": int(rows.tokens.shape[1]),
        "n_valid_positions": int(rows.valid.sum()),
        "positions": "valid (non-BOS, non-pad) positions of tokens.safetensors rows, row-major",
        "shapes": shapes,
        "statistics": statistics,
        "files": files,
    }
    atomic_write_json(Path(cache_dir) / "manifest.json", manifest)
    return manifest

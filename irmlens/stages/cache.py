"""Stage ``cache``: both models' activations at the studied layers on the same held-out review
tokens, in verified, resumable shards (``irmlens.cache``)."""

from __future__ import annotations

from pathlib import Path

from irmlens.stages.context import StudyContext, log


def run(ctx: StudyContext) -> None:
    from irmlens.cache.capture import build_paired_cache
    from irmlens.cache.tokens import tokenize_rows

    cfg, pair = ctx.cfg, ctx.pair
    hooked = pair.get()
    n_ctx = min(cfg.cache.n_ctx, hooked["base"].cfg.n_ctx)
    texts = [r.text for r in ctx.splits.heldout]
    rows = tokenize_rows(pair.tokenizer, texts, n_ctx, cfg.cache.max_rows)
    layers = ctx.studied_layers
    log(f"cache: {len(rows.tokens)} rows x {n_ctx} tokens of held-out reviews, layers {layers}")
    meta = {
        "source": "held-out reviews",
        "model_paths": {name: str(d) for name, d in pair.dirs.items()},
    }
    build_paired_cache(
        hooked,
        rows,
        layers,
        ctx.paths.cache,
        meta,
        batch_size=cfg.cache.batch_size,
        hook_kinds=tuple(cfg.cache.hook_kinds),
        dtype=cfg.cache.dtype,
        shard_rows=cfg.cache.shard_rows,
        # the target stage's implicit reward reads these instead of a second forward pass
        token_logprobs=("base", "rlhf"),
    )


def outputs(paths) -> list[Path]:
    return [paths.cache]


def recorded(paths) -> list[Path]:
    """The cache's index files; its shards are checksummed in the manifest and verified by the
    store whenever they are read, so the completion record need not hash gigabytes again."""
    return [paths.cache / n for n in ("manifest.json", "tokens.safetensors", "words.json")]


def owned(paths) -> set[Path]:
    """Files of the cache's layout besides those its record lists: the shards (each listed with
    its sha256 in the manifest, read even when the manifest is damaged) and the progress files of
    a cache being written (``irmlens.cache.store``)."""
    from irmlens.cache.store import PROGRESS

    root = paths.cache
    found = set(root.glob("*/*/shard-*.safetensors")) | set(root.glob("progress*.json"))
    return found | {root / PROGRESS}


def done(ctx: StudyContext) -> bool:
    from irmlens.cache.store import cache_is_complete

    return cache_is_complete(ctx.paths.cache)

"""Build a small paired cache, under torchrun or alone (tests/cache/test_cache_ddp.py runs it
both ways): the same seeded models and token rows in every process."""

import os
import sys

import torch
import torch.distributed as dist
from transformer_lens import HookedTransformer, HookedTransformerConfig

from irmlens.cache.capture import build_paired_cache
from irmlens.cache.tokens import TokenRows


def model(seed: int) -> HookedTransformer:
    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=16, n_ctx=12, d_head=8, n_heads=2, d_mlp=32, d_vocab=100,
        act_fn="gelu", normalization_type="LN",
    )  # fmt: skip
    return HookedTransformer(cfg).eval()


if __name__ == "__main__":
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 100, (50, 12), generator=g)
    valid = torch.rand(50, 12, generator=g) > 0.2
    rows = TokenRows(tokens, valid, -torch.ones_like(tokens), [])
    models = {"base": model(0), "rlhf": model(1)}
    build_paired_cache(
        models, rows, [0, 1], sys.argv[1], {"test": True}, batch_size=4, dtype="float32",
        shard_rows=8, hook_kinds=("resid_post", "mlp_out"), token_logprobs=("base", "rlhf"),
    )  # fmt: skip
    if dist.is_initialized():
        dist.destroy_process_group()

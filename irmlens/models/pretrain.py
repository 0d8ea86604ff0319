"""Pretrain the embedded default model: a tiny GPT-2 with a word-level (or BPE) tokenizer, on the
movie reviews.

No pretrained weights exist offline, so irmlens trains its own small "before" model in a few
minutes on a CPU. The result is an ordinary HF folder (``save_pretrained``) in the cache.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from irmlens.data.corpus import Review
from irmlens.io import atomic_dir, atomic_write_json, read_json
from irmlens.ranges import SEED, SIZE, Int, OneOf, Real, check_fields, ranged

BOS = "<|endoftext|>"
PAD = "<|pad|>"
UNK = "<|unk|>"
TOKENIZERS = ("bpe", "word")
# Part of the cache key of pretrained tiny models: bump when the tokenizer or model recipe changes.
RECIPE_VERSION = 4  # 4: no wall-clock budget (step-based learning-rate schedule only)


@dataclass
class PretrainConfig:
    """Defaults are the embedded default model (experiments/configs/tiny.toml): ~3.7 minutes on 2
    CPU cores. Training runs exactly ``max_steps`` steps on a step-based schedule: what is computed
    never depends on how fast the machine is (a slower one takes longer, to the same model)."""

    # byte-level BPE needs 300 or more (irmlens.checks.check_study)
    vocab_size: int = ranged(4096, Int(16))
    # "bpe" (byte-level BPE) or "word" (one token per whitespace-separated word, unknown words ->
    # <|unk|>): with word tokens every lexicon word in the vocabulary is one token, so the policy
    # can learn a utility per word and the IRM is scored on the unit the RM scores.
    tokenizer: str = ranged("word", OneOf(TOKENIZERS))
    n_layer: int = ranged(4, SIZE)
    # a multiple of n_head (__post_init__); its memory: irmlens.checks.check_memory
    d_model: int = ranged(
        128, SIZE, new_run=(Int(1, 65_536), "the tiny LM's width (its memory is checked too)")
    )
    n_head: int = ranged(4, SIZE)
    n_ctx: int = ranged(
        64, Int(8), new_run=(Int(8, 65_536), "the tiny LM's positions (its memory is checked too)")
    )
    batch_size: int = ranged(64, SIZE)
    lr: float = ranged(2e-3, Real(0.0, 1.0, lo_open=True))
    warmup_steps: int = ranged(50, Int(0))
    max_steps: int = ranged(650, SIZE)
    seed: int = ranged(0, SEED)

    def fingerprint(self, data_id: str) -> str:
        blob = json.dumps(
            {**asdict(self), "data": data_id, "recipe": RECIPE_VERSION}, sort_keys=True
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def __post_init__(self) -> None:
        check_fields(self, "pretrain")
        if self.d_model % self.n_head:
            raise ValueError(
                f"pretrain.d_model = {self.d_model} is not a multiple of pretrain.n_head = "
                f"{self.n_head} (each head gets d_model / n_head dimensions): use an n_head that "
                "divides d_model"
            )


def pretrain_bytes(cfg: PretrainConfig) -> int:
    """About how much memory pretraining ``cfg`` takes at its peak: float32 weights, gradients and
    Adam's two moments (16 bytes a parameter), and a batch's activations (each layer's residual,
    MLP and attention tensors, the attention matrices, and the logits with their gradient).
    An estimate to refuse the impossible before allocating, not a budget."""
    v, d, n, c, b = cfg.vocab_size + 3, cfg.d_model, cfg.n_layer, cfg.n_ctx, cfg.batch_size
    params = v * d + c * d + n * (12 * d * d + 13 * d) + 2 * d
    activations = b * c * (n * (16 * d + 3 * cfg.n_head * c) + 3 * v)
    return 16 * params + 4 * activations


def train_tokenizer(texts: list[str], vocab_size: int, kind: str = "bpe"):
    """A ``tokenizers`` tokenizer trained on ``texts``; every encoding starts with BOS.

    ``kind="bpe"``: byte-level BPE. ``kind="word"``: the ``vocab_size`` most frequent
    whitespace-separated words (the reviews are lower-cased with punctuation split off), others
    ``<|unk|>``; decoding joins tokens with spaces.
    Padding has its own token: trl's PPO tells padding from text by the pad id, so a pad equal to
    BOS would mask every prompt's first token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "word":
        tok = Tokenizer(models.WordLevel(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.decoder = decoders.WordPiece(prefix="\x00", cleanup=False)  # join with spaces
        trainer = trainers.WordLevelTrainer(
            vocab_size=vocab_size, special_tokens=[BOS, PAD, UNK], show_progress=False
        )
    elif kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[BOS, PAD],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    else:
        raise ValueError(f"tokenizer kind {kind!r}; choose one of {sorted(TOKENIZERS)}")
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=BOS,
        pad_token=PAD,
        unk_token=UNK if kind == "word" else None,
    )
    fast.model_max_length = 1 << 20
    return fast


def _token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """Concatenate documents, each starting with BOS (which doubles as the document separator)."""
    ids: list[int] = []
    for enc in tokenizer(texts)["input_ids"]:
        ids.extend(enc)
    return torch.tensor(ids, dtype=torch.long)


def _chunks(stream: torch.Tensor, n_ctx: int) -> torch.Tensor:
    n = stream.numel() // n_ctx
    return stream[: n * n_ctx].view(n, n_ctx)


@torch.no_grad()
def evaluate_perplexity(model, chunks: torch.Tensor, batch_size: int = 32) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(chunks), batch_size):
        batch = chunks[i : i + batch_size]
        out = model(input_ids=batch, labels=batch)
        n = batch.numel() - batch.shape[0]
        total += out.loss.item() * n
        count += n
    return math.exp(total / max(count, 1))


@torch.no_grad()
def sample_text(
    model, tokenizer, prompts: list[str], max_new_tokens: int = 30, seed: int = 0
) -> list[str]:
    torch.manual_seed(seed)
    model.eval()
    out = []
    for p in prompts:
        enc = tokenizer(p, return_tensors="pt")
        room = model.config.max_position_embeddings - enc["input_ids"].shape[1]
        gen = model.generate(
            **enc,
            max_new_tokens=max(1, min(max_new_tokens, room)),
            do_sample=True,
            top_k=50,
            pad_token_id=tokenizer.pad_token_id,
        )
        out.append(tokenizer.decode(gen[0], skip_special_tokens=True))
    return out


def pretrain_tiny_lm(
    cfg: PretrainConfig, train: list[Review], validation: list[Review], out_dir: str | Path
) -> dict:
    """Train tokenizer + GPT-2 and write an HF folder to ``out_dir`` atomically. Returns its metrics."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(cfg.seed)
    t0 = time.time()
    tokenizer = train_tokenizer([r.text for r in train], cfg.vocab_size, cfg.tokenizer)
    train_chunks = _chunks(_token_stream(tokenizer, [r.text for r in train]), cfg.n_ctx)
    val_chunks = _chunks(_token_stream(tokenizer, [r.text for r in validation]), cfg.n_ctx)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=cfg.n_ctx,
        n_ctx=cfg.n_ctx,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        progress = step / cfg.max_steps
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    t_train = time.time()
    step = 0
    losses = []
    pbar = tqdm(total=cfg.max_steps, desc="pretrain tiny LM", unit="step")
    while step < cfg.max_steps:
        idx = torch.randint(len(train_chunks), (cfg.batch_size,), generator=gen)
        batch = train_chunks[idx]
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        pbar.update(1)
        pbar.set_postfix(loss=f"{loss.item():.3f}")
    pbar.close()
    train_seconds = time.time() - t_train
    val_ppl = evaluate_perplexity(model, val_chunks)
    samples = sample_text(model, tokenizer, ["this movie is", "the plot", "i think the acting"])
    metrics = {
        "steps": step,
        "max_steps": cfg.max_steps,
        "finished": step == cfg.max_steps,  # a cached model is reused only when it did
        "train_tokens": step * cfg.batch_size * cfg.n_ctx,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - t0, 1),
        "final_train_loss": float(sum(losses[-20:]) / max(1, len(losses[-20:]))),
        "validation_perplexity": val_ppl,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "samples": samples,
        "config": asdict(cfg),
    }
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(Path(tmp) / "pretrain.json", metrics)
    return metrics


def load_pretrain_metrics(model_dir: str | Path) -> dict | None:
    p = Path(model_dir) / "pretrain.json"
    return read_json(p) if p.exists() else None

"""How far the default study's three training stages are from what this CPU allows.

    python experiments/benchmarks/demo_floor.py [--reps 8]

Pretraining (650 steps) and the two PPO runs (120 updates each) are 65% of the default study
(58% of ``make demo`` with its install). This
measures, in one process at the default model's shapes (tiny.toml: 4 layers, d_model 128,
vocabulary 4,096, float32, the machine's threads), each unit of their work beside its bound —
the matrix products it must compute, each timed alone at its shape, which no implementation in
float32 can avoid:

- a pretraining step: forward, backward and AdamW of the LM on 64 x 64 tokens;
- a PPO minibatch step as trl runs it: policy and value model forward and backward on 16 x 32
  tokens (prompt + completion), AdamW on both;
- a PPO rollout: the policy generating 16 tokens for 64 prompts, then the reference and value
  models' forward passes on the 64 x 32 tokens.

It then multiplies by the counts the default runs (650 steps; 2 runs x 120 updates x 16
minibatches and 1 rollout) into seconds: as measured, and at the bound. The bound of a
generation step is the forward products of its 64 new tokens. Weights are random (the shapes
alone set the cost).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from irmlens.allocator import keep_freed_memory

D_MODEL, N_LAYER, VOCAB, N_HEAD = 128, 4, 4096, 4
PRETRAIN = {"batch": 64, "n_ctx": 64, "steps": 650}
PPO = {"batch": 64, "minibatch": 16, "prompt": 16, "completion": 16, "updates": 120, "runs": 2}


def _config():
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=D_MODEL,
        n_layer=N_LAYER,
        n_head=N_HEAD,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )


def _median_seconds(fn, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _products_seconds(n_tokens: int, with_head: bool, backward: bool, reps: int) -> float:
    """The matrix products of one GPT-2 pass over ``n_tokens`` tokens (every block's four linear
    layers, and the tied head), forward and, with ``backward``, both backward products."""
    d = D_MODEL
    shapes = [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)] * N_LAYER
    if with_head:
        shapes.append((d, VOCAB))
    total = 0.0
    for k, m in shapes:
        x, w, g = torch.randn(n_tokens, k), torch.randn(k, m), torch.randn(n_tokens, m)
        products = [(x, w)] + ([(g, w.T), (x.T, g)] if backward else [])
        total += sum(_median_seconds(lambda a=a, b=b: a @ b, reps) for a, b in products)
    return total


def _pretrain_step(reps: int) -> float:
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(_config())
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01, betas=(0.9, 0.95))
    batch = torch.randint(VOCAB, (PRETRAIN["batch"], PRETRAIN["n_ctx"]))

    def step():
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return _median_seconds(step, reps)


def _ppo_models():
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = _config()
    value_cfg = _config()
    value_cfg.num_labels = 1
    return (
        GPT2LMHeadModel(cfg),
        GPT2LMHeadModel(cfg).eval(),
        GPT2ForSequenceClassification(value_cfg),
    )


def _ppo_minibatch_step(policy, value, reps: int) -> float:
    """trl's PPO minibatch, its model work: ``PolicyAndValueWrapper`` (value backbone + score
    head, and the policy with hidden states) forward, the log-probs of the completion, a loss on
    both, backward, one AdamW step over both models."""
    n, p = PPO["minibatch"], PPO["prompt"]
    ids = torch.randint(1, VOCAB, (n, p + PPO["completion"]))
    opt = torch.optim.AdamW([*policy.parameters(), *value.parameters()], lr=3e-4)

    def step():
        hidden = value.transformer(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        values = value.score(hidden)
        logits = policy(input_ids=ids, output_hidden_states=True).logits[:, p - 1 : -1]
        logprobs = torch.log_softmax(logits, -1).gather(-1, ids[:, p:, None])
        loss = -logprobs.mean() + values.pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()

    return _median_seconds(step, reps)


@torch.no_grad()
def _ppo_rollout(policy, ref, value, reps: int) -> float:
    n, p, c = PPO["batch"], PPO["prompt"], PPO["completion"]
    prompts = torch.randint(1, VOCAB, (n, p))
    ids = torch.randint(1, VOCAB, (n, p + c))

    def rollout():
        policy.generate(
            input_ids=prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=c,
            min_new_tokens=c,
            do_sample=True,
            top_k=0,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
        )
        ref(input_ids=ids, output_hidden_states=True)
        value.score(value.transformer(input_ids=ids).last_hidden_state)

    return _median_seconds(rollout, max(2, reps // 2))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=8)
    args = p.parse_args()
    keep_freed_memory()
    r = args.reps
    n_pre = PRETRAIN["batch"] * PRETRAIN["n_ctx"]
    n_mb = PPO["minibatch"] * (PPO["prompt"] + PPO["completion"])
    n_roll = PPO["batch"] * (PPO["prompt"] + PPO["completion"])
    policy, ref, value = _ppo_models()
    measured = {
        "pretraining step": _pretrain_step(r),
        "PPO minibatch step": _ppo_minibatch_step(policy, value, r),
        "PPO rollout": _ppo_rollout(policy, ref, value, r),
    }
    # generation: the prompt's pass, then 15 one-token passes, all at batch 64 (the KV cache
    # holds the rest); then the reference (with head) and value (without) passes
    generation = _products_seconds(PPO["batch"] * PPO["prompt"], True, False, r) + (
        PPO["completion"] - 1
    ) * _products_seconds(PPO["batch"], True, False, r)
    bound = {
        "pretraining step": _products_seconds(n_pre, True, True, r),
        "PPO minibatch step": _products_seconds(n_mb, True, True, r)
        + _products_seconds(n_mb, False, True, r),
        "PPO rollout": generation
        + _products_seconds(n_roll, True, False, r)
        + _products_seconds(n_roll, False, False, r),
    }
    minibatches = PPO["batch"] // PPO["minibatch"] * 4  # 4 PPO epochs (tiny.toml ppo_epochs)
    count = {
        "pretraining step": PRETRAIN["steps"],
        "PPO minibatch step": PPO["runs"] * PPO["updates"] * minibatches,
        "PPO rollout": PPO["runs"] * PPO["updates"],
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32")
    print(
        f"{'unit of work':20s} {'ms':>8s} {'bound ms':>9s} {'share':>6s} {'count':>6s} "
        f"{'s in demo':>10s} {'s at bound':>11s}"
    )
    total_m = total_b = 0.0
    for name, sec in measured.items():
        b, k = bound[name], count[name]
        total_m, total_b = total_m + sec * k, total_b + b * k
        print(
            f"{name:20s} {sec * 1e3:8.1f} {b * 1e3:9.1f} {b / sec:6.2f} {k:6d} "
            f"{sec * k:10.0f} {b * k:11.0f}"
        )
    print(
        f"pretraining + 2 PPO runs: {total_m:.0f} s as measured here, {total_b:.0f} s at the "
        f"bound (share {total_b / total_m:.2f})"
    )


if __name__ == "__main__":
    main()

"""Sampling completions and measuring reward and KL of a policy against its reference."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Samples:
    prompts: list[str]
    completions: list[str]
    sequences: torch.Tensor  # [n, prompt_len + new] left-padded prompt, then completion
    attention_mask: torch.Tensor
    prompt_len: int
    # sum over completion tokens of the sampling model's log p(token | prefix), from the logits
    # generation computed anyway (``with_logprobs``); None when not asked for
    logprobs: torch.Tensor | None = None


@torch.no_grad()
def _encode_prompts(model, tokenizer, prompts: list[str], max_new_tokens: int):
    """The prompts as a left-padded batch, each cut from the left (its end is what the completion
    continues) to leave room for ``max_new_tokens`` within the model's positions: a prompt of
    ``rlhf.prompt_max_words`` words can be more tokens than words (byte-level BPE), and a sequence
    past the last position fails inside the model. Prompts that fit are encoded unchanged."""
    config = getattr(model, "config", None)
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit - max_new_tokens < 1:
        return tokenizer(prompts, return_tensors="pt", padding=True)
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        return tokenizer(
            prompts,
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=limit - max_new_tokens,
        )
    finally:
        tokenizer.truncation_side = side


def sample_completions(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    seed: int,
    batch_size: int = 64,
    with_logprobs: bool = False,
) -> Samples:
    """Sample one completion per prompt (temperature 1, no top-k: the policy's own distribution).

    ``with_logprobs`` also keeps the sampling model's summed log-prob of each completion (what
    ``completion_logprobs`` of the same model returns, to float rounding), read off the raw
    logits of the generation itself: a KL against a reference then costs one forward pass, not
    two."""
    model.eval()
    tokenizer.padding_side = "left"
    enc = _encode_prompts(model, tokenizer, prompts, max_new_tokens)
    torch.manual_seed(seed)
    seqs, masks, completions, logprobs = [], [], [], []
    prompt_len = enc["input_ids"].shape[1]
    from tqdm.auto import tqdm

    batches = range(0, len(prompts), batch_size)
    # shown when long (rlhf.n_eval_prompts, validate.n_prompts): never silent for minutes
    for i in tqdm(batches, desc="sampling completions", disable=len(batches) < 8, leave=False):
        ids = enc["input_ids"][i : i + batch_size].to(model.device)
        am = enc["attention_mask"][i : i + batch_size].to(model.device)
        out = model.generate(
            input_ids=ids,
            attention_mask=am,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=True,
            top_k=0,
            temperature=1.0,
            pad_token_id=tokenizer.pad_token_id,
            # the same stopping rule for every model: trl's PPO clears the policy's
            # generation_config.eos_token_id, which would let "after" samples draw the EOS token
            # as an ordinary one while "before" samples have it blocked by min_new_tokens
            eos_token_id=tokenizer.eos_token_id,
            output_logits=with_logprobs,
            return_dict_in_generate=True,
        )
        out, steps = out.sequences, out.logits
        new = out[:, prompt_len:]
        if with_logprobs:  # the raw (unprocessed) logits: the model's own distribution
            logp = torch.log_softmax(torch.stack(steps, dim=1).float(), dim=-1)
            logprobs.append(logp.gather(-1, new[..., None])[..., 0].sum(-1).cpu())
        completions += tokenizer.batch_decode(new, skip_special_tokens=True)
        seqs.append(out.cpu())
        masks.append(torch.cat([am.cpu(), torch.ones_like(new.cpu())], dim=1))
    lp = torch.cat(logprobs) if with_logprobs else None
    return Samples(prompts, completions, torch.cat(seqs), torch.cat(masks), prompt_len, lp)


@torch.no_grad()
def completion_logprobs(model, samples: Samples, batch_size: int = 64) -> torch.Tensor:
    """Sum over completion tokens of log p(token | prefix), one value per sample. Only the
    completion positions go through the unembedding (``logits_to_keep``): the prompt's logits
    over the whole vocabulary were most of the cost."""
    model.eval()
    totals = []
    n_new = samples.sequences.shape[1] - samples.prompt_len
    for i in range(0, len(samples.sequences), batch_size):
        seq = samples.sequences[i : i + batch_size].to(model.device)
        am = samples.attention_mask[i : i + batch_size].to(model.device)
        pos = (am.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=seq, attention_mask=am, position_ids=pos, logits_to_keep=n_new + 1)
        logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
        tok_lp = logp.gather(-1, seq[:, samples.prompt_len :, None]).squeeze(-1)
        totals.append(tok_lp.sum(-1).cpu())
    return torch.cat(totals)


def kl_estimate(policy, reference, samples: Samples) -> float:
    """Monte-Carlo KL(policy || reference) per completion, in nats, on samples drawn from the
    policy (their own log-probs where sampling kept them)."""
    own = samples.logprobs if samples.logprobs is not None else completion_logprobs(policy, samples)
    return float((own - completion_logprobs(reference, samples)).mean())

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


@torch.no_grad()
def sample_completions(
    model, tokenizer, prompts: list[str], max_new_tokens: int, seed: int, batch_size: int = 64
) -> Samples:
    """Sample one completion per prompt (temperature 1, no top-k: the policy's own distribution)."""
    model.eval()
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    torch.manual_seed(seed)
    seqs, masks, completions = [], [], []
    prompt_len = enc["input_ids"].shape[1]
    for i in range(0, len(prompts), batch_size):
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
        )
        new = out[:, prompt_len:]
        completions += tokenizer.batch_decode(new, skip_special_tokens=True)
        seqs.append(out.cpu())
        masks.append(torch.cat([am.cpu(), torch.ones_like(new.cpu())], dim=1))
    return Samples(prompts, completions, torch.cat(seqs), torch.cat(masks), prompt_len)


@torch.no_grad()
def completion_logprobs(model, samples: Samples, batch_size: int = 64) -> torch.Tensor:
    """Sum over completion tokens of log p(token | prefix), one value per sample."""
    model.eval()
    totals = []
    for i in range(0, len(samples.sequences), batch_size):
        seq = samples.sequences[i : i + batch_size].to(model.device)
        am = samples.attention_mask[i : i + batch_size].to(model.device)
        pos = (am.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=seq, attention_mask=am, position_ids=pos).logits[:, :-1]
        logp = torch.log_softmax(logits.float(), dim=-1)
        tok_lp = logp.gather(-1, seq[:, 1:, None]).squeeze(-1)
        totals.append(tok_lp[:, samples.prompt_len - 1 :].sum(-1).cpu())
    return torch.cat(totals)


def kl_estimate(policy, reference, samples: Samples) -> float:
    """Monte-Carlo KL(policy || reference) per completion, in nats, on samples drawn from the policy."""
    return float(
        (completion_logprobs(policy, samples) - completion_logprobs(reference, samples)).mean()
    )

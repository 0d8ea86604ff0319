"""Causal validation of an IRM's features (the paper's first validation): the reward of
generations with a feature set ablated in the RLHF model, or steered into the base model, beside
control sets matched on what their intervention removes.

Every arm samples the same prompts with the same seed, so arms are compared prompt by prompt
(paired bootstrap). Library code: it takes models, an SAE and prompts, and knows nothing of run
folders (the ``validate`` stage wires it to a study).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from irmlens.rlhf.sampling import Samples, completion_logprobs, sample_completions
from irmlens.validate.interventions import Edits, edit_blocks, removed_variance_share


@dataclass
class Generations:
    samples: Samples
    rewards: torch.Tensor  # [n_prompts], the reward model's score of each completion


@torch.no_grad()
def generate_and_score(
    model,
    tokenizer,
    prompts: list[str],
    reward_model,
    max_new_tokens: int,
    seed: int,
    edits: Edits | None = None,
) -> Generations:
    """One completion per prompt (the RLHF stage's sampler), with ``edits`` applied to their
    blocks' outputs at every position, scored by ``reward_model``."""
    with edit_blocks(model, edits):
        samples = sample_completions(
            model, tokenizer, prompts, max_new_tokens, seed, with_logprobs=True
        )
    rewards = torch.tensor(reward_model.score(samples.completions), dtype=torch.float64)
    return Generations(samples, rewards)


@torch.no_grad()
def intervention_kl(model, samples: Samples, edits: Edits) -> float:
    """KL(intervened || unintervened) per completion, in nats, estimated on ``samples`` drawn
    from the intervened model: an intervention that just breaks the model shows here. The
    intervened log-probs are the ones sampling kept, where it did."""
    intervened = samples.logprobs
    if intervened is None:
        with edit_blocks(model, edits):
            intervened = completion_logprobs(model, samples)
    return float((intervened - completion_logprobs(model, samples)).mean())


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], n_ctx: int, edits: Edits | None = None) -> float:
    """Perplexity of ``texts`` (each cut to ``n_ctx`` tokens) under the model with ``edits``:
    the held-out language-modelling cost of an intervention, beside its reward."""
    tokenizer.padding_side = "right"
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=n_ctx)
    ids, am = enc["input_ids"].to(model.device), enc["attention_mask"].to(model.device)
    nll = count = 0.0
    with edit_blocks(model, edits):
        for i in range(0, len(ids), 32):
            logits = model(input_ids=ids[i : i + 32], attention_mask=am[i : i + 32]).logits
            logp = torch.log_softmax(logits[:, :-1].float(), -1)
            tok_lp = logp.gather(-1, ids[i : i + 32, 1:, None]).squeeze(-1)
            mask = am[i : i + 32, 1:].float()
            nll -= float((tok_lp * mask).sum())
            count += float(mask.sum())
    return math.exp(nll / count) if count else float("nan")


@dataclass
class MatchedDraw:
    features: list[int]
    removed_share: float  # of the activation variance, as the main set's is measured
    mean_log_frequency: float


@torch.no_grad()
def matched_random_sets(
    sae,
    acts: torch.Tensor,
    frequency: torch.Tensor,
    main: Sequence[int],
    n_draws: int = 5,
    seed: int = 0,
    neighbours: int = 8,
    tries: int = 40,
    codes: torch.Tensor | None = None,
) -> tuple[float, list[MatchedDraw]]:
    """Random feature sets of the main set's size, matched to it on firing frequency (each main
    feature replaced by a random one among its ``neighbours`` nearest in log frequency, never a
    main feature) and then on the share of activation variance their ablation removes (of
    ``tries`` candidate sets, the ``n_draws`` closest to the main set's share). Returns the main
    set's share and the draws, each with its own share, so the matching can be judged."""
    main = [int(i) for i in main]
    acts = acts.to(sae.W_dec.device)
    logf = torch.log10(frequency.double().clamp_min(1e-7))
    pool = [i for i in range(len(frequency)) if i not in set(main) and frequency[i] > 0]
    if len(pool) < len(main):
        raise ValueError(f"only {len(pool)} live features outside the set of {len(main)}")
    if codes is None:  # ``sae.encode(acts)``; given by a caller that measures more sets on acts
        codes = torch.cat(
            [sae.encode(acts[i : i + 8192].to(sae.W_dec.dtype)) for i in range(0, len(acts), 8192)]
        )
    target = removed_variance_share(sae, acts, main, codes=codes)
    rng = random.Random(seed)
    pool_t = torch.tensor(pool)
    candidates = []
    for _ in range(tries):
        chosen: list[int] = []
        for f in main:
            order = torch.argsort((logf[pool_t] - logf[f]).abs()).tolist()
            near = [pool[j] for j in order if pool[j] not in chosen][:neighbours]
            chosen.append(rng.choice(near))
        share = removed_variance_share(sae, acts, chosen, codes=codes)
        candidates.append(MatchedDraw(sorted(chosen), share, float(logf[chosen].mean())))
    candidates.sort(key=lambda d: abs(math.log((d.removed_share + 1e-12) / (target + 1e-12))))
    return target, candidates[:n_draws]


@torch.no_grad()
def code_statistics(sae, acts: torch.Tensor, batch_size: int = 8192) -> tuple[torch.Tensor, ...]:
    """Per feature: mean code and firing frequency (code > 0) over ``acts`` [n, d_model]."""
    total = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    for i in range(0, len(acts), batch_size):
        x = acts[i : i + batch_size].to(sae.W_dec.device, sae.W_dec.dtype)
        codes = sae.encode(x).double().cpu()
        total += codes.sum(0)
        fired += (codes > 0).double().sum(0)
    n = max(len(acts), 1)
    return total / n, fired / n


@torch.no_grad()
def decoder_directions(sae) -> torch.Tensor:
    """Each feature's unit-code contribution in activation space, ``decode(e_i) - decode(0)``
    [d_sae, d_model] (``W_dec`` itself for a plain decoder; right under a folded whitening too)."""
    eye = torch.eye(sae.cfg.d_sae, dtype=sae.W_dec.dtype, device=sae.W_dec.device)
    return (sae.decode(eye) - sae.decode(torch.zeros_like(eye[:1]))).float().cpu()


def token_utilities(tokenizer, utility, vocab_size: int) -> torch.Tensor:
    """The reward model's utility of each token that is a lexicon word on its own (spaces
    stripped; 0 for the rest): what a direction's logit effect is weighed by."""
    out = torch.zeros(vocab_size, dtype=torch.float32)
    for i in range(vocab_size):
        u = utility(tokenizer.decode([i]).strip())
        if u is not None:
            out[i] = float(u)
    return out


def reward_logit_scores(directions: torch.Tensor, w_u: torch.Tensor, utilities: torch.Tensor):
    """Per feature: how far its decoder direction, read through the unembedding (logit lens,
    final norm ignored), moves the logits of lexicon words in the direction of their utility,
    ``sum_t u_t (d_i W_U - mean_t d_i W_U)_t / sum_t |u_t|``. Positive: it promotes rewarded
    words over penalised ones."""
    w_u, u = w_u.float().cpu(), utilities.float()
    # linear in the logits, so computed without the [d_sae, vocab] matrix (GBs at real sizes)
    read = w_u @ u - w_u.mean(1) * u.sum()
    return directions.float() @ read / u.abs().sum().clamp_min(1e-12)

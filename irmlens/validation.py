"""Causal validation of an IRM's features (the paper's first validation): the reward of
generations with a feature set ablated in the RLHF model, or steered into the base model, beside
control sets matched on what their intervention removes.

Every arm samples the same prompts with the same seed, so arms are compared prompt by prompt
(paired bootstrap). Library code: it takes models, an SAE and prompts, and knows nothing of run
folders (the ``validate`` stage wires it to a study).
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from irmlens.interventions import Edit, edit_block_output, removed_variance_share
from irmlens.rlhf.sampling import Samples, completion_logprobs, sample_completions


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
    layer: int | None = None,
    edit: Edit | None = None,
) -> Generations:
    """One completion per prompt (the RLHF stage's sampler), with ``edit`` applied to block
    ``layer``'s output at every position, scored by ``reward_model``."""
    ctx = edit_block_output(model, layer, edit) if edit is not None else contextlib.nullcontext()
    with ctx:
        samples = sample_completions(model, tokenizer, prompts, max_new_tokens, seed)
    rewards = torch.tensor(reward_model.score(samples.completions), dtype=torch.float64)
    return Generations(samples, rewards)


@torch.no_grad()
def intervention_kl(model, samples: Samples, layer: int, edit: Edit) -> float:
    """KL(intervened || unintervened) per completion, in nats, estimated on ``samples`` drawn
    from the intervened model: an intervention that just breaks the model shows here."""
    with edit_block_output(model, layer, edit):
        intervened = completion_logprobs(model, samples)
    return float((intervened - completion_logprobs(model, samples)).mean())


def mean_ci(
    values: torch.Tensor, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """Mean and percentile bootstrap CI over the items (prompts)."""
    v = torch.as_tensor(values, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(v), (n_boot, len(v)), generator=gen)
    means = v[idx].mean(1)
    a = (1 - level) / 2
    return float(v.mean()), float(means.quantile(a)), float(means.quantile(1 - a))


def paired_difference_ci(
    a: torch.Tensor, b: torch.Tensor, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of ``a - b`` over the same prompts, with its bootstrap CI (prompts resampled once
    for both, so the prompts' own variance cancels)."""
    return mean_ci(torch.as_tensor(a) - torch.as_tensor(b), n_boot, seed)


def share_of_gain(r_arm: float, r_base: float, r_rlhf: float, kind: str) -> float | None:
    """Ablation: the share of the RLHF gain the intervention removes, ``(R_rlhf - R_arm) /
    (R_rlhf - R_base)``; steering: the share it reproduces, ``(R_arm - R_base) / (R_rlhf -
    R_base)``. None when RLHF gained nothing (the ratio would be noise)."""
    gain = r_rlhf - r_base
    if not math.isfinite(gain) or abs(gain) < 1e-9:
        return None
    if kind == "ablate":
        return (r_rlhf - r_arm) / gain
    if kind == "steer":
        return (r_arm - r_base) / gain
    raise ValueError(f"kind {kind!r}: ablate or steer")


@dataclass
class MatchedDraw:
    features: list[int]
    removed_share: float  # of the activation variance, as the main set's is measured
    mean_log_frequency: float


def matched_random_sets(
    sae,
    acts: torch.Tensor,
    frequency: torch.Tensor,
    main: Sequence[int],
    n_draws: int = 5,
    seed: int = 0,
    neighbours: int = 8,
    tries: int = 40,
) -> tuple[float, list[MatchedDraw]]:
    """Random feature sets of the main set's size, matched to it on firing frequency (each main
    feature replaced by a random one among its ``neighbours`` nearest in log frequency, never a
    main feature) and then on the share of activation variance their ablation removes (of
    ``tries`` candidate sets, the ``n_draws`` closest to the main set's share). Returns the main
    set's share and the draws, each with its own share, so the matching can be judged."""
    main = [int(i) for i in main]
    logf = torch.log10(frequency.double().clamp_min(1e-7))
    pool = [i for i in range(len(frequency)) if i not in set(main) and frequency[i] > 0]
    if len(pool) < len(main):
        raise ValueError(f"only {len(pool)} live features outside the set of {len(main)}")
    target = removed_variance_share(sae, acts, main)
    rng = random.Random(seed)
    pool_t = torch.tensor(pool)
    candidates = []
    for _ in range(tries):
        chosen: list[int] = []
        for f in main:
            order = torch.argsort((logf[pool_t] - logf[f]).abs()).tolist()
            near = [pool[j] for j in order if pool[j] not in chosen][:neighbours]
            chosen.append(rng.choice(near))
        share = removed_variance_share(sae, acts, chosen)
        candidates.append(MatchedDraw(sorted(chosen), share, float(logf[chosen].mean())))
    candidates.sort(key=lambda d: abs(math.log((d.removed_share + 1e-12) / (target + 1e-12))))
    return target, candidates[:n_draws]

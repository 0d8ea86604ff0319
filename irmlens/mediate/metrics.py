"""Deterministic reward metrics on fixed text, per row, and shares of the RLHF gain with
bootstrap CIs over rows (rows resampled jointly across the arms they pair).

Two metrics, both read off one forward pass's logits (``RewardMetrics``):

- ``expected_utility``: the reward the policy expects from its next token,
  ``sum_v pi(v | context) u(v)`` averaged over positions (``u`` the reward model's utility of each
  token read as a word, 0 where it scores nothing);
- ``implicit_reward``: what KL-regularised RL optimises, read off the policy itself:
  ``beta * (log pi(t | context) - log pi_base(t | context))`` averaged over the scored tokens
  (the tokens of lexicon words on cached text, the completion on the RLHF model's own samples),
  as stage ``target`` computes it per word.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# name -> what the report says it is
METRICS = {
    "expected_utility": "expected next-token utility: mean over positions of "
    "sum_v pi(v | context) u(v)",
    "implicit_reward": "implicit reward: beta * mean over the scored tokens of "
    "log pi(t | context) - log pi_base(t | context)",
}


def expected_utility(
    logits: torch.Tensor, utility: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Per row, the mean over its valid positions of ``sum_v softmax(logits)_v u(v)``: the
    reward the policy expects from its next token (``utility`` [vocab], 0 where the reward
    model scores nothing; ``mask`` [rows, positions])."""
    per_position = logits.float().softmax(-1) @ utility.to(logits.device).float()
    m = mask.to(logits.device).float()
    return (per_position * m).sum(1) / m.sum(1).clamp_min(1.0)


def implicit_reward(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    scored: torch.Tensor,
    base_logprobs: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Per row, ``beta`` times the mean over its ``scored`` positions of the token's log-prob
    under ``logits`` minus its log-prob under the base model (``base_logprobs``, [rows, n_ctx]
    as ``next_token_logprobs`` gives them); 0 for a row with no scored position."""
    from irmlens.cache.capture import next_token_logprobs

    lp = next_token_logprobs(logits, tokens.to(logits.device)).cpu()
    m = scored.float()
    return beta * ((lp - base_logprobs) * m).sum(1) / m.sum(1).clamp_min(1.0)


@dataclass
class RewardMetrics:
    """The metrics of one text set: ``self(logits)`` -> name -> per-row values. ``predicting``
    marks the positions whose next-token distribution expected utility averages; ``scored`` the
    tokens implicit reward reads (None: no implicit reward)."""

    tokens: torch.Tensor
    predicting: torch.Tensor
    utility: torch.Tensor
    scored: torch.Tensor | None = None
    base_logprobs: torch.Tensor | None = None
    beta: float = 1.0

    def __call__(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"expected_utility": self.one(logits, "expected_utility")}
        if self.scored is not None and self.base_logprobs is not None:
            out["implicit_reward"] = self.one(logits, "implicit_reward")
        return out

    def one(self, logits: torch.Tensor, name: str) -> torch.Tensor:
        """The one metric ``name`` (what a curve reads: computing only it halves the cost
        after each forward pass)."""
        if name == "expected_utility":
            return expected_utility(logits, self.utility, self.predicting).cpu()
        if name == "implicit_reward" and self.base_logprobs is not None:
            return implicit_reward(logits, self.tokens, self.scored, self.base_logprobs, self.beta)
        raise ValueError(f"no metric {name!r} on this text (known: {', '.join(METRICS)})")

    @torch.no_grad()
    def with_base(self, base) -> RewardMetrics:
        """The same metrics with the base model's log-probs of the tokens filled in (one
        forward pass), which implicit reward subtracts."""
        from irmlens.cache.capture import next_token_logprobs

        logits = base(self.tokens.to(next(base.parameters()).device))
        self.base_logprobs = next_token_logprobs(logits, self.tokens.to(logits.device)).cpu()
        return self

    def rows(self, index) -> RewardMetrics:
        """The metrics of a subset of the rows."""

        def part(t):
            return None if t is None else t[index]

        return RewardMetrics(
            self.tokens[index],
            self.predicting[index],
            self.utility,
            part(self.scored),
            part(self.base_logprobs),
            self.beta,
        )


def token_utility(tokenizer, word_utility, vocab_size: int) -> torch.Tensor:
    """``u(v)``: the reward model's utility of each vocabulary item read as a word (stripped of
    its leading space and case), 0 for tokens it does not score."""
    u = torch.zeros(vocab_size)
    for v in range(min(vocab_size, len(tokenizer))):
        word = tokenizer.decode([v]).strip().lower()
        if word:
            u[v] = float(word_utility(word) or 0.0)
    return u


def word_token_mask(
    word_id: torch.Tensor, in_word: torch.Tensor | None, valid: torch.Tensor, keep: set[int]
) -> torch.Tensor:
    """``[rows, n_ctx]``: the token positions of the words whose id is in ``keep`` (a word's
    tokens are the run of ``in_word`` positions ending where ``word_id`` marks its end, as stage
    ``target`` reads them)."""
    out = torch.zeros_like(valid, dtype=torch.bool)
    ends = (word_id >= 0) & valid
    for r, p in torch.nonzero(ends).tolist():
        if int(word_id[r, p]) not in keep:
            continue
        start = p
        if in_word is not None:
            while start - 1 > 0 and in_word[r, start - 1] and word_id[r, start - 1] < 0:
                start -= 1
        out[r, start : p + 1] = True
    return out


def share(patched: torch.Tensor, base: torch.Tensor, rlhf: torch.Tensor, removed: bool) -> float:
    """The share of the gain ``mean(rlhf) - mean(base)`` a patch removes (``removed``: from the
    RLHF model, ``(rlhf - patched) / gain``) or reproduces (in the base, ``(patched - base) /
    gain``); NaN when there is no gain."""
    gain = float(rlhf.mean() - base.mean())
    if abs(gain) < 1e-12:
        return float("nan")
    moved = float(rlhf.mean() - patched.mean()) if removed else float(patched.mean() - base.mean())
    return moved / gain


def share_ci(
    patched: torch.Tensor,
    base: torch.Tensor,
    rlhf: torch.Tensor,
    removed: bool,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``share`` with its 95% percentile bootstrap CI, the rows resampled jointly."""
    gen = torch.Generator().manual_seed(seed)
    n = len(base)
    idx = torch.randint(0, n, (n_boot, n), generator=gen)
    p, b, r = patched.double()[idx].mean(1), base.double()[idx].mean(1), rlhf.double()[idx].mean(1)
    gain = r - b
    moved = (r - p) if removed else (p - b)
    ok = gain.abs() > 1e-12
    boots = (moved[ok] / gain[ok]) if ok.any() else torch.tensor([float("nan")])
    lo, hi = torch.quantile(boots, torch.tensor([0.025, 0.975], dtype=boots.dtype)).tolist()
    return share(patched, base, rlhf, removed), lo, hi

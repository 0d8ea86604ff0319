"""The model-level implicit reward: what KL-regularised RL optimises, read off the two policies.

For a KL-regularised RL objective with coefficient beta, the optimal policy satisfies
``beta * log pi_rlhf(y|x) / pi_base(y|x) = r(x, y) - const``; per word, the implicit reward of
emitting it in context is ``beta * sum over its tokens of (log pi_rlhf - log pi_base)``. Averaged
over a word's occurrences in the cached text, it is the reference every feature-based IRM is
compared with: what the policy itself learned, with no dictionary in between.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def token_log_ratios(base, rlhf, tokens: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """``log pi_rlhf(t_i | t_<i) - log pi_base(t_i | t_<i)`` per position ([n_rows, n_ctx];
    position 0 gets 0). ``base``/``rlhf``: HookedTransformers (or any module mapping tokens to
    logits)."""
    from irmlens.cache.capture import next_token_logprobs

    out = []
    device = next(base.parameters()).device
    for i in range(0, len(tokens), batch_size):
        t = tokens[i : i + batch_size].to(device)
        lp = [next_token_logprobs(m(t), t) for m in (base, rlhf)]
        out.append((lp[1] - lp[0]).cpu())
    return torch.cat(out)


def word_implicit_rewards(
    log_ratio: torch.Tensor,
    valid: torch.Tensor,
    word_id: torch.Tensor,
    in_word: torch.Tensor | None,
    beta: float = 1.0,
) -> dict[int, float]:
    """Mean over a word's occurrences of ``beta *`` the summed log-ratio of its tokens.

    A word's tokens are the run of ``in_word`` positions ending where ``word_id`` marks its end
    (without ``in_word``, only the last token counts).
    """
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    lr = log_ratio.double()
    for r in range(word_id.shape[0]):
        ends = torch.nonzero((word_id[r] >= 0) & valid[r]).squeeze(-1).tolist()
        for p in ends:
            start = p
            if in_word is not None:
                while start - 1 > 0 and in_word[r, start - 1] and word_id[r, start - 1] < 0:
                    start -= 1
            w = int(word_id[r, p])
            sums[w] = sums.get(w, 0.0) + beta * float(lr[r, start : p + 1].sum())
            counts[w] = counts.get(w, 0) + 1
    return {w: sums[w] / counts[w] for w in sums}

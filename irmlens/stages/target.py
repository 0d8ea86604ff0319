"""Stage ``target``: the model-level implicit reward of every word of the cached text
(``beta * sum log pi_rlhf / pi_base`` over the word's tokens, averaged over its occurrences),
computed once from the pair (``target/``).

With a known reward model (``data.lexicon`` a lexicon) it is a reference: the IRM stage scores it
on the held-out words and fits an RM-free IRM to it. With ``data.lexicon = "none"`` (a pair whose
reward model is unknown) it *is* the study's target: the words seen at least
``data.implicit_min_count`` times form the lexicon (in units of its standard deviation) that the
IRM explains, the validation scores generations with and the labelers read (``StudyContext.rm``).
"""

from __future__ import annotations

from pathlib import Path

from irmlens.io import atomic_dir, atomic_write_json, atomic_write_text
from irmlens.stages.context import StudyContext, log

TABLE = "implicit_reward.tsv"


def run(ctx: StudyContext) -> None:
    import torch

    from irmlens.cache.store import load_token_logprobs, load_token_rows
    from irmlens.irm.implicit import token_log_ratios, word_implicit_rewards

    cfg, paths = ctx.cfg, ctx.paths
    rows = load_token_rows(paths.cache)
    base, rlhf = (load_token_logprobs(paths.cache, m) for m in ("base", "rlhf"))
    if base is not None and rlhf is not None:  # recorded by the cache stage's float32 forward
        log_ratio = rlhf - base
    else:  # a bf16 (GPU) cache: a float32 pass of its own
        hooked = ctx.pair.get()
        log_ratio = token_log_ratios(
            hooked["base"], hooked["rlhf"], rows.tokens, cfg.cache.batch_size
        )
    beta = cfg.rlhf.kl_coef
    implicit = word_implicit_rewards(log_ratio, rows.valid, rows.word_id, rows.in_word, beta)
    ids = rows.word_id[rows.valid]
    counts = torch.bincount(ids[ids >= 0], minlength=len(rows.words)).tolist()
    lines = ["# word\timplicit_reward\tn_occurrences"] + [
        f"{rows.words[w]}\t{v:.9g}\t{counts[w]}"
        for w, v in sorted(implicit.items(), key=lambda kv: rows.words[kv[0]])
    ]
    kept = sum(counts[w] >= cfg.data.implicit_min_count for w in implicit)
    given = cfg.data.lexicon != "none"
    info = {
        "kind": "lexicon" if given else "implicit_reward",
        "true_reward_model": given,
        "n_words": len(implicit),
        "n_target_words": None if given else kept,
        "min_count": None if given else cfg.data.implicit_min_count,
        "beta": beta,
        "definition": "beta * mean over a word's occurrences in the cached text of the summed "
        f"log pi_rlhf/pi_base of its tokens (beta = rlhf.kl_coef = {beta})",
        "role": "a reference beside the true reward model"
        if given
        else "the study's target: no reward model was given (data.lexicon = 'none'), so the IRM "
        "explains what the tuning taught the policy, read off the pair itself",
    }
    with atomic_dir(paths.target) as tmp:
        atomic_write_text(tmp / TABLE, "\n".join(lines) + "\n")
        atomic_write_json(tmp / "target.json", info)
    log(
        f"target: implicit reward of {len(implicit)} words"
        + ("" if given else f"; {kept} seen >= {cfg.data.implicit_min_count} times are the target")
    )


def read_implicit(paths) -> dict[str, tuple[float, int]]:
    """word -> (implicit reward, occurrences) from ``target/implicit_reward.tsv``."""
    from irmlens.rewards.implicit import read_implicit_table

    return read_implicit_table(paths.target / TABLE)


def outputs(paths) -> list[Path]:
    return [paths.target]

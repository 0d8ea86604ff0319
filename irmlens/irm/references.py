"""The references an IRM is read against: what the policy itself learned (the model-level implicit
reward) and the paper's contrastive estimator, both scored on the IRM's held-out words."""

from __future__ import annotations

from irmlens.irm.contrastive import ContrastiveConfig, paper_estimator
from irmlens.irm.metrics import bootstrap_tau_ci, kendall_tau, spearman


def implicit_reward_reference(
    implicit: dict[int, float], targets, heldout_irm: dict, kl_coef: float, seed: int
) -> dict:
    """The held-out scores of the model-level implicit reward per word (``implicit``: word id ->
    beta x mean summed log pi_rlhf / pi_base, see ``irmlens.irm.implicit``)."""
    held = [w for w in sorted(heldout_irm) if w in implicit]
    imp = [implicit[w] for w in held]
    truth = [targets.utility[w] for w in held]
    row = {
        "heldout_kendall_tau": kendall_tau(imp, truth),
        "heldout_spearman": spearman(imp, truth),
        "heldout_kendall_tau_ci": list(
            bootstrap_tau_ci({w: implicit[w] for w in held}, targets.utility, seed=seed)
        ),
        "definition": "beta * mean over occurrences of the summed log pi_rlhf/pi_base of the "
        f"word's tokens (beta = rlhf.kl_coef = {kl_coef})",
    }
    return row


def paper_reference(
    model,
    tokenizer,
    saes_by_hook: dict,
    sentences: list[str],
    targets,
    split,
    word_utility,
    icfg,
    neutral_near_zero: bool = False,
) -> dict:
    """The paper's contrastive estimator on the same word split, on the words the model can read
    (a word its tokenizer maps to <unk> has no activation of its own)."""
    import torch

    unk = getattr(tokenizer, "unk_token", None)

    def known(w: str) -> bool:
        return unk is None or unk not in tokenizer.tokenize(w)

    fit_w = [targets.words[w] for w in split.fit_words if known(targets.words[w])]
    held_w = [targets.words[w] for w in split.heldout_words if known(targets.words[w])]
    counts = torch.bincount(targets.word, minlength=len(targets.words)).tolist()
    word_counts = {
        targets.words[i]: c for i, c in enumerate(counts) if c and known(targets.words[i])
    }
    return paper_estimator(
        model,
        tokenizer,
        saes_by_hook,
        sentences,
        fit_w,
        held_w,
        word_utility,
        word_counts,
        icfg.alphas,
        ContrastiveConfig(
            contexts_per_word=icfg.paper_contexts_per_word,
            cv_folds=icfg.cv_folds,
            seed=icfg.seed,
        ),
        neutral_near_zero,
    )


def lens_reference(
    scores_by_layer: dict[int, dict[int, float]],
    layer: int,
    targets,
    heldout_irm: dict[int, float],
    seed: int,
    top_tokens: list[str] | None = None,
) -> dict:
    """The activation difference lens as a reference (``irmlens.diff.lens``): each held-out
    word's lens logit (word id -> score, per studied layer) scored against the true utilities
    like the IRM, with the paired CI of (IRM tau - lens tau) at ``layer``, on the words the
    tokenizer can spell (the IRM's tau on those words is given beside it)."""
    scores = scores_by_layer[layer]
    held = [w for w in sorted(heldout_irm) if w in scores]
    if len(held) < 3:
        raise ValueError(f"the lens scores {len(held)} held-out words: too few to rank")
    irm_common = {w: heldout_irm[w] for w in held}
    lens = {w: scores[w] for w in held}
    truth = [targets.utility[w] for w in held]
    return {
        "heldout_kendall_tau": kendall_tau([lens[w] for w in held], truth),
        "heldout_spearman": spearman([lens[w] for w in held], truth),
        "heldout_kendall_tau_ci": list(bootstrap_tau_ci(lens, targets.utility, seed=seed)),
        "difference_ci": list(bootstrap_tau_ci(irm_common, targets.utility, other=lens, seed=seed)),
        "irm_heldout_kendall_tau_same_words": kendall_tau([irm_common[w] for w in held], truth),
        "n_heldout_words": len(held),
        "layer": layer,
        "by_layer": {
            str(la): kendall_tau(
                [s[w] for w in held if w in s], [targets.utility[w] for w in held if w in s]
            )
            for la, s in sorted(scores_by_layer.items())
        },
        **({"top_tokens": top_tokens} if top_tokens is not None else {}),
    }

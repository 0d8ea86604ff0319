"""Two more measures of the main set: the paper's own figure (the RLHF model's reward on
continuations of fixed-length review prefixes, before and after ablating the set) and each of its
features ablated alone. Library code: no run folders.
"""

from __future__ import annotations

from irmlens.validate.arms import SAE_FEATURES, Arms
from irmlens.validate.sets import FeatureSet
from irmlens.validate.statistics import difference, mean_ci, paired_difference_ci


def paper_number(arms: Arms, main: FeatureSet, reviews: list[str], v) -> dict | None:
    """Mean reward of the RLHF model's continuations of the reviews' first
    ``v.paper_prefix_words`` words, before and after ablating ``main`` (None when fewer than
    two reviews are longer)."""
    from irmlens.validate.measures import generate_and_score

    prefix_words = v.paper_prefix_words
    words = [text.split() for text in reviews]
    prefixes = [" ".join(w[:prefix_words]) for w in words if len(w) > prefix_words]
    if len(prefixes) < 2:  # validate.paper_prefix_words longer than the held-out reviews
        return None
    model, boot, seed = arms.bench.models["rlhf"], arms.n_boot, arms.seed
    args = (arms.bench.tokenizer, prefixes, arms.rm, arms.max_new_tokens, seed)
    before = generate_and_score(model, *args).rewards
    after = generate_and_score(model, *args, arms.edits(main, "ablate", None, SAE_FEATURES)).rewards
    b, a = mean_ci(before, boot, seed), mean_ci(after, boot, seed)
    return {
        "prefix_words": prefix_words,
        "n_prefixes": len(prefixes),
        "reward_before": b[0],
        "reward_before_ci": [b[1], b[2]],
        "reward_after": a[0],
        "reward_after_ci": [a[1], a[2]],
        "after_minus_before": difference(paired_difference_ci(after, before, boot, seed)),
    }


def single_feature_effects(
    arms: Arms, main: FeatureSet, rlhf_rewards, n_prompts: int
) -> list[dict]:
    """Each of ``main``'s features ablated alone in the RLHF model on the first ``n_prompts``
    prompts: its reward change, paired over them."""
    from irmlens.validate.interventions import ablation
    from irmlens.validate.measures import generate_and_score

    prompts, rlhf_rewards = arms.prompts[:n_prompts], rlhf_rewards[:n_prompts]
    out = []
    for la, feats in main.features.items():
        for j in feats:
            edits = {(la, arms.hook_kind): ablation(main.bases[la], [j])}
            rewards = generate_and_score(
                arms.bench.models["rlhf"],
                arms.bench.tokenizer,
                prompts,
                arms.rm,
                arms.max_new_tokens,
                arms.seed,
                edits,
            ).rewards
            d = paired_difference_ci(rewards, rlhf_rewards, arms.n_boot, arms.seed)
            out.append(
                {
                    "dictionary": main.extra.get("dictionary_label", "shared"),
                    "layer": la,
                    "local_feature": j,
                    "reward_change": d[0],
                    "ci": [d[1], d[2]],
                }
            )
    return out

"""The references an IRM is read against: what the policy itself learned (the model-level implicit
reward) and the paper's contrastive estimator, both scored on the IRM's held-out words."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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


# ------------------------------------------------------------------ the registry


@dataclass
class ReferenceContext:
    """What the references are built from: the chosen space (spec, matrices, fit), every fitted
    space by name, the targets and split, the per-word implicit reward (word id -> value), and
    what the lens reads: the spaces' inputs, the cached rows' valid mask, the RLHF model
    (HookedTransformer) and its tokenizer. ``rm_free``: ``data.lexicon = "none"``, the implicit
    reward is the target itself."""

    spec: object  # SpaceSpec
    chosen: object  # FeatureSpace
    main: object  # IRMFit
    fits: dict
    built: dict
    targets: object
    split: object
    icfg: object
    implicit: dict[int, float]
    kl_coef: float
    rm_free: bool
    inputs: object  # SpaceInputs
    valid: object  # [n_rows, n_ctx] bool
    rlhf_model: object
    tokenizer: object


@dataclass(frozen=True)
class ReferenceSpec:
    """One reference the IRM is read beside: its name in ``metrics.json`` ``reference``, and how
    it is scored (None: not applicable to this study)."""

    name: str
    build: Callable[[ReferenceContext], dict | None]


REFERENCES: dict[str, ReferenceSpec] = {}


def register_reference(spec: ReferenceSpec) -> ReferenceSpec:
    """Add (or replace) a reference; every IRM fitted after this call is read beside it."""
    REFERENCES[spec.name] = spec
    return spec


def build_references(ctx: ReferenceContext) -> dict[str, dict]:
    """Every applicable registered reference, in registry order."""
    out = {}
    for spec in REFERENCES.values():
        if (row := spec.build(ctx)) is not None:
            out[spec.name] = row
    return out


def _raw_difference(ctx: ReferenceContext) -> dict:
    """The ridge on the raw activation difference over the chosen space's layers."""
    from irmlens.irm.controls import score_row

    ref = ctx.spec.reference
    return score_row(ctx.fits[ref], ctx.main, ctx.targets, ctx.icfg.seed) | {
        "description": ctx.built[ref].description
    }


def _model_implicit_reward(ctx: ReferenceContext) -> dict:
    """What the policy itself learned, per word (stage ``target``)."""
    row = implicit_reward_reference(
        ctx.implicit, ctx.targets, ctx.main.heldout_irm, ctx.kl_coef, ctx.icfg.seed
    )
    if ctx.rm_free:
        row["is_the_target"] = True  # its tau is 1 by definition
    return row


def _rm_free_irm(ctx: ReferenceContext) -> dict | None:
    """The main space's ridge fitted on the same fit positions to every word's implicit reward
    instead of the RM's utilities (non-lexicon words get theirs too, not 0), scored on the
    held-out words against the true utilities: how far the pair alone, without its RM, gets.
    None in an RM-free study (there it is the main IRM)."""
    from irmlens.irm.controls import score_row
    from irmlens.irm.fit import fit_and_score

    if ctx.rm_free:
        return None
    held = set(ctx.split.heldout_words)  # their implicit rewards stay out of the fit
    utility = {w: v for w, v in ctx.implicit.items() if w not in held}
    chosen, targets, icfg = ctx.chosen, ctx.targets, ctx.icfg
    free = fit_and_score(chosen.fit, chosen.held, targets, ctx.split, icfg, utility=utility)
    ci = bootstrap_tau_ci(free.heldout_irm, targets.utility, seed=icfg.seed)
    return score_row(free, ctx.main, targets, icfg.seed) | {
        "heldout_kendall_tau_ci": list(ci),
        "description": "the main space's IRM fitted to the model-level implicit reward of each "
        "word (no reward model), scored against the true utilities on the held-out words",
    }


def _activation_difference_lens(ctx: ReferenceContext) -> dict:
    """The activation difference lens at every studied layer (mean rlhf - base activation over
    each cached row's first ``LENS_FIRST_K`` tokens, read through the RLHF model's unembedding)."""
    from irmlens.diff.lens import LENS_FIRST_K, logit_lens, mean_difference, word_scores

    inputs, targets, tok = ctx.inputs, ctx.targets, ctx.tokenizer
    held_words = [targets.words[w] for w in ctx.split.heldout_words]
    ids = {w: i for i, w in enumerate(targets.words)}
    scores, top, top_all = {}, None, None
    for i, layer in enumerate(inputs.layers):
        base, rlhf = inputs.acts["base"][i], inputs.acts["rlhf"][i]
        logits = logit_lens(ctx.rlhf_model, mean_difference(base, rlhf, ctx.valid, LENS_FIRST_K))
        scores[layer] = {ids[w]: v for w, v in word_scores(logits, tok, held_words).items()}
        if layer == inputs.layer:
            top = [tok.decode([t]).strip() for t in logits.topk(10).indices.tolist()]
            # beside Minder et al.'s first positions: every position of every row (the mean
            # difference the mediate stage reads as the reward direction)
            every = logit_lens(
                ctx.rlhf_model, mean_difference(base, rlhf, ctx.valid, ctx.valid.shape[1])
            )
            top_all = [tok.decode([t]).strip() for t in every.topk(10).indices.tolist()]
    row = lens_reference(scores, inputs.layer, targets, ctx.main.heldout_irm, ctx.icfg.seed, top)
    row["top_tokens_all_positions"] = top_all
    row["description"] = (
        f"activation difference lens: mean rlhf - base {inputs.kind} difference over the first "
        f"{LENS_FIRST_K} tokens of every cached row, read through the RLHF model's unembedding; "
        "a held-out word's score is its first token's logit"
    )
    return row


for _spec in (
    ReferenceSpec("raw_difference", _raw_difference),
    ReferenceSpec("model_implicit_reward", _model_implicit_reward),
    ReferenceSpec("rm_free_irm", _rm_free_irm),
    ReferenceSpec("activation_difference_lens", _activation_difference_lens),
):
    register_reference(_spec)

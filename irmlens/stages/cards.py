"""Stage ``cards``: feature cards (top contexts, quantile samples, histograms, logit effects,
partners) for the most divergent shared-SAE features and the sparse IRM's features at every
layer they sit (``diff/cards.json``)."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

from irmlens.io import atomic_write_json, csv_value, read_json
from irmlens.stages.context import StudyContext, log


def run(ctx: StudyContext) -> None:
    """Feature cards for the IRM layer's most divergent shared-SAE features and for every sparse
    IRM feature in a shared dictionary, at whichever layer it sits (a multi-layer IRM's layer-1
    features get theirs). Each card names its feature as (dictionary, layer, index)."""
    from safetensors.torch import load_file

    cfg, paths, layer = ctx.cfg, ctx.paths, ctx.irm_layer
    features = read_json(paths.diff / "features.json")
    irm = read_json(paths.irm / "metrics.json")
    coef = load_file(str(paths.irm / "coefficients.safetensors"))["coef"]
    divergent = {f["feature"]: f for f in features["divergent_features"]}
    sparse: dict[int, list[int]] = {}
    for ref in irm["sparse"]["feature_refs"]:
        if ref["dictionary"] == "shared":
            sparse.setdefault(ref["layer"], []).append(ref["local_feature"])
    chosen = {layer: [f["feature"] for f in features["divergent_features"]][: cfg.diff.n_cards]}
    for la, feats in sparse.items():
        chosen.setdefault(la, []).extend(f for f in feats if f not in chosen[la])
    validation_of = _validation_of(ctx)
    text = _Text(ctx)
    cards = []
    for la in sorted(chosen):
        table = divergent if la == layer else {}
        cards += _layer_cards(ctx, text, la, chosen[la], table, set(sparse.get(la, ())), irm, coef)
    for card in cards:
        card.update(validation_of(card["layer"], card["feature"]))
    atomic_write_json(paths.cards, cards)
    per_layer = {la: len(f) for la, f in sorted(chosen.items())}
    n_sparse = sum(len(f) for f in sparse.values())
    log(f"cards: {len(cards)} feature cards per layer {per_layer} ({n_sparse} sparse-IRM features)")


class _Text:
    """What every layer's cards read the same way, loaded once: the cached token rows, the
    base model's unembedding, and the tokenizer's strings of a token and of a context."""

    def __init__(self, ctx: StudyContext) -> None:
        from irmlens.cache.store import load_token_rows

        self.rows = load_token_rows(ctx.paths.cache)
        self.tok = ctx.pair.tokenizer
        self.w_u = ctx.pair.get()["base"].W_U.detach()

    def token_str(self, i: int) -> str:
        return self.tok.decode([i])

    def window_text(self, ids: list[int]) -> list[str]:
        from irmlens.diff.cards import token_pieces

        return token_pieces(self.tok, ids)


def _layer_cards(
    ctx: StudyContext,
    text: _Text,
    layer: int,
    chosen: list[int],
    divergent: dict[int, dict],
    sparse: set[int],
    irm: dict,
    coef,
) -> list[dict]:
    """The cards of one layer's chosen shared-SAE features."""
    from irmlens.cache.store import load_activations
    from irmlens.diff.cards import (
        activation_histograms,
        logit_effects,
        quantile_contexts,
        top_contexts,
    )
    from irmlens.irm.fit import irm_feature_weights
    from sae_training.train import encode_batched, load_sae

    paths, rows = ctx.paths, text.rows
    hook = ctx.hook(layer)
    sae = load_sae(paths.sae_dir("shared", hook, ctx.widest))
    weights = irm_feature_weights(irm, coef, sae.cfg.d_sae, layer)
    codes = {
        m: encode_batched(sae, load_activations(paths.cache, m, hook)) for m in ("base", "rlhf")
    }
    csv_rows = {}
    if paths.features_table(layer).exists():  # every studied layer has one
        with open(paths.features_table(layer), encoding="utf-8") as f:
            csv_rows = {int(r["feature"]): r for r in csv.DictReader(f)}
    cards = []
    for j in chosen:
        summary = divergent.get(j) or {k: csv_value(v) for k, v in csv_rows.get(j, {}).items()}
        cards.append(
            {
                "dictionary": "shared",
                "layer": layer,
                "feature": j,
                "reason": ("divergent" if j in divergent else "")
                + (" sparse-IRM" if j in sparse else ""),
                "divergence": summary.get("divergence"),
                "divergence_null": summary.get("divergence_null"),
                "divergence_beyond_null": summary.get("divergence_beyond_null"),
                "relative_change": summary.get("relative_change"),
                "frequency_base": summary.get("frequency_base"),
                "frequency_rlhf": summary.get("frequency_rlhf"),
                "mean_change": summary.get("mean_change"),
                "irm_weight": weights.get(j),
                **{
                    k: summary.get(k)
                    for k in (
                        "base_partner",
                        "base_cosine",
                        "rlhf_partner",
                        "rlhf_cosine",
                        "matching_tag",
                    )
                },
                **{
                    f"{name}_{m}": pick(
                        codes[m],
                        rows.tokens,
                        rows.valid,
                        text.token_str,
                        j,
                        window_text=text.window_text,
                    )
                    for name, pick in (("contexts", top_contexts), ("quantiles", quantile_contexts))
                    for m in ("base", "rlhf")
                },
                "histogram": activation_histograms(codes["base"], codes["rlhf"], j),
                **logit_effects(sae.W_dec[j].detach(), text.w_u, text.token_str),
            }
        )
    return cards


def _validation_of(ctx: StudyContext) -> Callable[[int, int], dict]:
    """A card's reward-relevance labels (each labeler) and its single-feature ablation effect,
    for shared-dictionary features (the cards' dictionary): both files are read once."""
    labels: dict[tuple[int, int], dict[str, dict]] = {}
    effects: dict[tuple[int, int], dict] = {}
    if (ctx.paths.labels / "labels.json").exists():
        found = read_json(ctx.paths.labels / "labels.json")
        for row in found["all_features"]:  # the shared dictionaries' features
            key = (row["layer"], row["local_feature"])
            labels.setdefault(key, {})["lexicon"] = {
                "label": row["label"],
                "explanation": row["explanation"],
            }
        from irmlens.report.summary import llm_labeler_passed

        for name, rows in found["sets"]["sparse_irm"].items():
            if name == "llm" and not llm_labeler_passed(found):
                name = "llm (unchecked: it failed its known-answer check)"
            for row in rows:
                if row["dictionary"] == "shared":
                    labels.setdefault((row["layer"], row["feature"]), {})[name] = {
                        "label": row["label"],
                        "explanation": row["explanation"],
                    }
    if (ctx.paths.validate / "validation.json").exists():
        for e in read_json(ctx.paths.validate / "validation.json")["single_feature_ablation"]:
            if e.get("dictionary", "shared") == "shared":
                effects[(e["layer"], e["local_feature"])] = {
                    "reward_change": e["reward_change"],
                    "ci": e["ci"],
                }

    def of(layer: int, feature: int) -> dict:
        key = (layer, feature)
        return {"labels": labels.get(key, {}), "ablation_effect": effects.get(key)}

    return of


def outputs(paths) -> list[Path]:
    return [paths.cards]

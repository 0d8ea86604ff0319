"""Stage ``cards``: feature cards (top contexts, histograms, logit effects, partners) for the most
divergent shared-SAE features and the sparse IRM's features (``diff/cards.json``)."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

from irmlens.io import atomic_write_json, csv_value, read_json
from irmlens.stages.context import StudyContext, log


def run(ctx: StudyContext) -> None:
    """Feature cards for the most divergent shared-SAE features and the sparse IRM's features."""
    from safetensors.torch import load_file

    from irmlens.cache.store import load_activations, load_token_rows
    from irmlens.diff.cards import activation_histograms, logit_effects, top_contexts
    from irmlens.irm.fit import irm_feature_weights
    from sae_training.train import encode_batched, load_sae

    cfg, paths, pair, layer, width = ctx.cfg, ctx.paths, ctx.pair, ctx.irm_layer, ctx.widest
    hook = ctx.hook(layer)
    sae = load_sae(paths.sae_dir("shared", hook, width))
    features = read_json(paths.diff / "features.json")
    irm = read_json(paths.irm / "metrics.json")
    coef = load_file(str(paths.irm / "coefficients.safetensors"))["coef"]
    weights = irm_feature_weights(irm, coef, sae.cfg.d_sae)
    table = {f["feature"]: f for f in features["divergent_features"]}
    chosen = [f["feature"] for f in features["divergent_features"]][: cfg.diff.n_cards]
    sparse = [
        ref["local_feature"]
        for ref in irm["sparse"]["feature_refs"]
        if ref["dictionary"] == "shared" and ref["layer"] == layer
    ]
    chosen += [f for f in sparse if f not in chosen]
    codes = {
        m: encode_batched(sae, load_activations(paths.cache, m, hook)) for m in ("base", "rlhf")
    }
    rows = load_token_rows(paths.cache)
    tok = pair.tokenizer

    def token_str(i: int) -> str:
        return tok.decode([i])

    w_u = pair.get()["base"].W_U.detach()
    with open(paths.features_table(layer), encoding="utf-8") as f:
        csv_rows = {int(r["feature"]): r for r in csv.DictReader(f)}
    cards = []
    for j in chosen:
        summary = table.get(j) or {k: csv_value(v) for k, v in csv_rows[j].items()}
        cards.append(
            {
                "feature": j,
                "layer": layer,
                "reason": ("divergent" if j in table else "")
                + (" sparse-IRM" if j in sparse else ""),
                "divergence": summary["divergence"],
                "frequency_base": summary["frequency_base"],
                "frequency_rlhf": summary["frequency_rlhf"],
                "mean_change": summary["mean_change"],
                "irm_weight": weights.get(j),
                **{
                    k: summary[k]
                    for k in (
                        "base_partner",
                        "base_cosine",
                        "rlhf_partner",
                        "rlhf_cosine",
                        "matching_tag",
                    )
                },
                "contexts_base": top_contexts(codes["base"], rows.tokens, rows.valid, token_str, j),
                "contexts_rlhf": top_contexts(codes["rlhf"], rows.tokens, rows.valid, token_str, j),
                "histogram": activation_histograms(codes["base"], codes["rlhf"], j),
                **logit_effects(sae.W_dec[j].detach(), w_u, token_str),
            }
        )
    validation_of = _validation_of(ctx)
    for card in cards:
        card.update(validation_of(card["layer"], card["feature"]))
    atomic_write_json(paths.cards, cards)
    log(f"cards: {len(cards)} feature cards ({len(sparse)} sparse-IRM features)")


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
        for name, rows in found["sets"]["sparse_irm"].items():
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

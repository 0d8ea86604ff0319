"""Stage ``diff``: per-feature divergence through the widest shared SAE (base vs rlhf, and base
vs null) and Hungarian matching of the per-model dictionaries, for every studied layer."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import torch

from irmlens.io import atomic_write_json, atomic_write_text
from irmlens.stages.context import StudyContext, log


def run(ctx: StudyContext) -> None:
    """Per-feature divergence through the widest shared SAE (base vs rlhf, and base vs null), and
    Hungarian matching of the base and rlhf dictionaries of the same width, for every studied
    layer (``diff/features_layer{L}.csv``, ``diff/matching_layer{L}.json``); the IRM layer's
    summary and most divergent features are ``features.json``."""
    from irmlens.cache.store import load_token_rows

    paths, layer = ctx.paths, ctx.irm_layer
    rows = load_token_rows(paths.cache)
    # every file is computed before any is replaced: a recomputation (``--force``) interrupted
    # while computing leaves the previous tables whole
    staged: dict[Path, str] = {}
    per_layer = {la: _diff_layer(ctx, la, rows, staged) for la in sorted(ctx.studied_layers)}
    result = per_layer[layer] | {
        "layers": [
            {k: r[k] for k in ("layer", "n_features", "n_divergent", "n_divergent_null")}
            for r in per_layer.values()
        ]
    }
    if ctx.cfg.sae.crosscoder.architecture != "none":
        staged[paths.diff / "crosscoder.json"] = json.dumps(_crosscoder(ctx))
    for path, text in staged.items():
        atomic_write_text(path, text)
    atomic_write_json(paths.diff / "features.json", result)  # last: marks the stage done


def _crosscoder(ctx: StudyContext) -> dict:
    """The crosscoder's diffing measures (``irmlens.diff.crosscoder.crosscoder_diff``) on every
    cached position of its hook, base against the RLHF model and against the null model."""
    from irmlens.cache.store import load_activations
    from irmlens.diff.crosscoder import crosscoder_diff
    from sae_training.crosscoder import load_crosscoder, stack_models

    cc, ccfg = load_crosscoder(ctx.crosscoder_dir)
    hook = ccfg["hook_name"]
    x = stack_models({m: load_activations(ctx.paths.cache, m, hook) for m in ccfg["models"]})
    out = crosscoder_diff(cc, x, ccfg["models"])
    counts = {m: p["tag_counts"]["tuned_only"] for m, p in out["pairs"].items()}
    log(f"diff: crosscoder {hook}: tuned-only latents (Δ >= 0.9) per model {counts}")
    return {"layer": ctx.irm_layer, "hook": hook, "width": cc.width, **out}


def outputs(paths) -> list[Path]:
    return [
        paths.diff / "features.json",
        *paths.diff.glob("features_layer*.csv"),
        *paths.diff.glob("matching_layer*.json"),
        *paths.diff.glob("crosscoder.json"),  # only where the study has a crosscoder
    ]


def _diff_layer(ctx: StudyContext, layer: int, rows, staged: dict[Path, str]) -> dict:
    """One layer's divergence and matching; its files go into ``staged`` (path -> text)."""
    from irmlens.cache.store import load_activations, load_manifest
    from irmlens.diff.features import (
        FeatureCodes,
        beyond_null,
        divergence_scale,
        feature_divergence,
        match_dictionaries,
        shared_feature_partners,
    )
    from sae_training.train import encode_batched, load_sae

    cfg, paths, width = ctx.cfg, ctx.paths, ctx.widest
    hook = ctx.hook(layer)
    sae = load_sae(paths.sae_dir("shared", hook, width))
    models = load_manifest(paths.cache)["models"]
    acts = {m: load_activations(paths.cache, m, hook) for m in models}
    codes = {m: encode_batched(sae, x) for m, x in acts.items()}
    d = cfg.diff
    scale = divergence_scale(sae.W_dec, acts["base"])
    div = feature_divergence(FeatureCodes(codes["base"], codes["rlhf"]), d.min_frequency, scale)
    null_div = (
        feature_divergence(FeatureCodes(codes["base"], codes["null"]), d.min_frequency, scale)
        if "null" in codes
        else None
    )
    key = beyond_null(div["divergence"], null_div["divergence"] if null_div else None)
    w_base = load_sae(paths.sae_dir("base", hook, width)).W_dec
    w_rlhf = load_sae(paths.sae_dir("rlhf", hook, width)).W_dec
    matching = match_dictionaries(w_base, w_rlhf, d.matching_threshold)  # (b) paired dictionaries
    partners = shared_feature_partners(sae.W_dec, w_base, w_rlhf, d.matching_threshold)
    table, divergent = _feature_table(codes, div, null_div, key, partners, rows, d.top_n)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(table[0]))
    writer.writeheader()
    writer.writerows(table)
    staged[paths.features_table(layer)] = buf.getvalue()
    n_div = int((div["divergence"] > d.threshold).sum())
    n_null = int((null_div["divergence"] > d.threshold).sum()) if null_div else None
    n_beyond = int((key > d.threshold).sum()) if null_div else None
    result = {
        "layer": layer,
        "hook": hook,
        "sae": {"model": "shared", "width": width},
        "threshold": d.threshold,
        "min_frequency": d.min_frequency,
        "score": (
            "RMS norm of the change the feature writes (RMS code change x decoder norm), "
            "as a fraction of the RMS activation norm"
        ),
        "ranking": "divergence - divergence_null" if null_div else "divergence",
        "n_features": sae.cfg.d_sae,
        "n_divergent": n_div,
        "n_divergent_null": n_null,
        "n_divergent_beyond_null": n_beyond,
        "feature_matching": {
            k: v for k, v in matching.items() if k not in ("partner", "cosine", "tag_base")
        }
        | {"width": width, "layer": layer},
        "divergent_features": divergent,
    }
    staged[paths.matching_file(layer)] = _matching_text(matching)
    log(
        f"diff layer {layer}: {n_div} of {sae.cfg.d_sae} shared-SAE features above divergence {d.threshold}"
        + (f" (null pair: {n_null}; beyond the null's: {n_beyond})" if n_null is not None else "")
        + f"; paired dictionaries: {matching['n_shared']} shared, {matching['n_base_only']} "
        f"base-only, {matching['n_rlhf_only']} rlhf-only (cosine >= {d.matching_threshold})"
    )
    return result


def _feature_table(codes, div, null_div, key, partners, rows, top_n: int) -> tuple[list, list]:
    """Every shared-dictionary feature's row in feature order (divergence, the null pair's, the
    ranking key, paired partners), and the ``top_n`` first by the ranking key with the words
    whose code rose, fell, and was highest."""
    word = rows.word_id[rows.valid]
    ends = torch.nonzero(word >= 0).squeeze(-1)
    delta = codes["rlhf"][ends] - codes["base"][ends]
    base_at_ends = codes["base"][ends]
    # stable: ties (unscored features) keep feature order, so the table is the same everywhere
    order = torch.argsort(key, descending=True, stable=True)
    table = [
        {"feature": j, **{k: float(v[j]) for k, v in div.items()}}
        | (
            {
                "divergence_null": float(null_div["divergence"][j]),
                "relative_change_null": float(null_div["relative_change"][j]),
            }
            if null_div
            else {}
        )
        | {"divergence_beyond_null": float(key[j])}
        | {k: v[j] for k, v in partners.items()}
        for j in range(len(key))
    ]
    divergent = [
        {
            **table[j],
            "top_words_increase": _word_means_of(delta[:, j], word[ends], rows.words, 5),
            "top_words_decrease": _word_means_of(-delta[:, j], word[ends], rows.words, 5),
            "top_words_base": _word_means_of(base_at_ends[:, j], word[ends], rows.words, 5),
        }
        for j in order[:top_n].tolist()
    ]
    return table, divergent


def _matching_text(matching: dict) -> str:
    """The paired dictionaries' matching file: each base feature's partner, cosine and tag."""
    cosines = [None if c != c else c for c in matching["cosine"].tolist()]
    out = {
        "partner": matching["partner"].tolist(),
        "cosine": cosines,
        "tag_base": matching["tag_base"],
    }
    return json.dumps(out, indent=2, allow_nan=False) + "\n"


def _word_means_of(
    values: torch.Tensor, word: torch.Tensor, words: list[str], top: int
) -> list[str]:
    """Words (at least 2 occurrences) with the largest mean of ``values`` over their positions."""
    from irmlens.irm.fit import word_means

    means = word_means(values.double(), word, min_count=2)
    return [words[w] for w in sorted(means, key=lambda w: -means[w])[:top]]

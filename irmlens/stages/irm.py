"""Stage ``irm``: the implicit reward model in every registered feature space on one word split,
the chosen space's controls and references, the sparse IRM, the paper's estimator, per-word
divergence and attribution (``irm/``).

All its files are written into a temporary folder that replaces ``irm/`` in one rename, so a
recomputation (``irmlens irm --force``) that is interrupted leaves the previous results whole.
"""

from __future__ import annotations

from pathlib import Path

import torch

from irmlens.errors import ConfigError
from irmlens.io import atomic_dir, atomic_write_json, atomic_write_text
from irmlens.stages.context import StudyContext, log


def _inputs(ctx: StudyContext, kind: str | None = None):
    """The spaces' inputs (activations, dictionaries, positions) of hook kind ``kind`` (default:
    the studied one), the targets, the word split and the cache's token rows."""
    from irmlens.bases import load_bases
    from irmlens.cache.store import load_activations, load_manifest, load_token_rows
    from irmlens.irm.fit import position_targets, split_words
    from irmlens.irm.spaces import SpaceInputs

    paths, layers = ctx.paths, sorted(ctx.studied_layers)
    li = layers.index(ctx.irm_layer)
    hooks = [ctx.hook(la, kind) for la in layers]
    models = load_manifest(paths.cache)["models"]
    acts = {m: [load_activations(paths.cache, m, h) for h in hooks] for m in models}
    dictionaries, labels = load_bases(ctx, layers, ctx.irm_layer, kind or ctx.hook_kind)
    rows = load_token_rows(paths.cache)
    targets = position_targets(rows.word_id[rows.valid], rows.words, ctx.rm.word_utility)
    split = split_words(targets, ctx.cfg.irm)
    positions = (targets.position[split.fit_positions], targets.position[split.heldout_positions])
    inputs = SpaceInputs(layers, li, acts, dictionaries, labels, positions, kind or ctx.hook_kind)
    log(
        f"irm: {len(split.fit_words)} fit words ({len(split.fit_positions)} positions incl. "
        f"non-lexicon), {len(split.heldout_words)} held-out words "
        f"({len(split.heldout_positions)} positions); layers {layers}, IRM layer {ctx.irm_layer}"
        f", {kind or ctx.hook_kind}"
    )
    return inputs, targets, split, rows


def _fit_spaces(inputs, targets, split, icfg):
    """Every available space fitted and scored; the table of them; the chosen spec."""
    from irmlens.irm.controls import retention
    from irmlens.irm.fit import fit_and_score
    from irmlens.irm.metrics import bootstrap_tau_ci
    from irmlens.irm.spaces import SPACES, available

    specs = available(inputs, selectable=True) + available(inputs, selectable=False)
    built = {spec.name: spec.build(inputs) for spec in specs}
    fits = {n: fit_and_score(sp.fit, sp.held, targets, split, icfg) for n, sp in built.items()}
    table = []
    for spec in specs:
        f, sp = fits[spec.name], built[spec.name]
        ref_tau = fits[spec.reference if spec.selectable else "raw_difference"]
        ci = bootstrap_tau_ci(f.heldout_irm, targets.utility, seed=icfg.seed)
        table.append(
            {
                "name": spec.name,
                "description": sp.description,
                "n_features": int(sp.fit.shape[1]),
                "heldout_kendall_tau": f.heldout_kendall_tau,
                "heldout_kendall_tau_ci": list(ci),
                "heldout_spearman": f.heldout_spearman,
                "cv_r2": f.cv_r2,
                "signal_retention": retention(f.heldout_kendall_tau, ref_tau.heldout_kendall_tau),
            }
        )
        log(
            f"irm space {spec.name:16s} tau {f.heldout_kendall_tau:+.3f} [{ci[0]:+.3f}, "
            f"{ci[1]:+.3f}]  CV R2 {f.cv_r2:+.4f}"
        )
    candidates = [s for s in specs if s.selectable]
    if icfg.space == "auto":
        chosen = max(candidates, key=lambda s: fits[s.name].cv_r2)
    elif icfg.space in {s.name for s in candidates}:
        chosen = SPACES[icfg.space]
    else:  # the config's checks make this unreachable for a complete run
        raise ConfigError(f"irm.space = {icfg.space!r} is not available in this run")
    return built, fits, table, chosen


def _sparse(chosen, targets, split, icfg, feature_ref, raw_tau: float):
    """The sparse IRM: ``irm.sparse_k`` features chosen greedily; its fit, features and row."""
    from irmlens.irm.controls import retention
    from irmlens.irm.fit import sparse_irm
    from irmlens.irm.metrics import bootstrap_tau_ci

    sparse, feats = sparse_irm(
        chosen.fit, chosen.held, targets, split, icfg, icfg.sparse_k, chosen.n_features
    )
    row = {
        "k": icfg.sparse_k,
        "features": feats,
        "feature_refs": [feature_ref(j) for j in feats],
        "heldout_kendall_tau": sparse.heldout_kendall_tau,
        "heldout_kendall_tau_ci": list(
            bootstrap_tau_ci(sparse.heldout_irm, targets.utility, seed=icfg.seed)
        ),
        "heldout_spearman": sparse.heldout_spearman,
        "signal_retention": retention(sparse.heldout_kendall_tau, raw_tau),
    }
    return sparse, feats, row


def run(ctx: StudyContext) -> None:
    from irmlens.irm.controls import ControlContext, retention, run_controls
    from irmlens.irm.references import ReferenceContext, build_references

    cfg, icfg = ctx.cfg, ctx.cfg.irm
    other_kinds = _other_hook_kinds(ctx, icfg)
    inputs, targets, split, rows = _inputs(ctx)
    built, fits, spaces_table, spec = _fit_spaces(inputs, targets, split, icfg)
    chosen, main = built[spec.name], fits[spec.name]
    how = "best CV R2 on fit words" if icfg.space == "auto" else "configured"
    log(f"irm: main space {spec.name} ({how})")

    # Controls: the same construction without what the IRM claims (a random dictionary, ...).
    controls_ctx = ControlContext(
        spec, chosen, main, inputs, targets, split, icfg, cfg.seed, ctx.d_model
    )
    controls = run_controls(controls_ctx, of_sparse=False)
    # References: raw differences, what the policy learned, the RM-free IRM, the lens.
    implicit, hooked = _implicit_by_word_id(ctx, targets), ctx.pair.get()
    references = build_references(
        ReferenceContext(
            spec,
            chosen,
            main,
            fits,
            built,
            targets,
            split,
            icfg,
            implicit,
            cfg.rlhf.kl_coef,
            cfg.data.lexicon == "none",
            inputs,
            rows.valid,
            hooked["rlhf"],
            ctx.pair.tokenizer,
        )
    )
    _log_lens(references.get("activation_difference_lens"))
    # The sparse IRM (k features) and its control; the same selection on the crosscoder.
    raw_tau = fits[spec.reference].heldout_kendall_tau
    sparse, chosen_feats, sparse_row = _sparse(
        chosen, targets, split, icfg, lambda j: spec.feature_ref(j, inputs), raw_tau
    )
    controls_ctx.sparse = sparse
    controls |= run_controls(controls_ctx, of_sparse=True)
    crosscoder_sparse = _crosscoder_sparse(built, fits, inputs, targets, split, icfg)
    paper = _paper(ctx, inputs, targets, split, hooked["rlhf"])
    result, div_words = _result(
        ctx, inputs, targets, split, spec, chosen, main, sparse, chosen_feats
    )
    result.reference, result.signal_retention = (
        references,
        retention(main.heldout_kendall_tau, raw_tau),
    )
    result.spaces, result.sparse, result.crosscoder_sparse = (
        spaces_table,
        sparse_row,
        crosscoder_sparse,
    )
    result.controls, result.paper_estimator = controls, paper
    result.hook_kinds = {
        ctx.hook_kind: _hook_kind_row(ctx, ctx.hook_kind, spec.name, spaces_table)
    } | other_kinds
    _log_scores(result, raw_tau, sparse, icfg)
    _write(ctx.paths, main, targets, implicit, div_words, result.to_json())


def _log_lens(lens: dict | None) -> None:
    if lens:
        log(
            f"irm: activation difference lens tau {lens['heldout_kendall_tau']:.3f} on "
            f"{lens['n_heldout_words']} held-out words (IRM on them "
            f"{lens['irm_heldout_kendall_tau_same_words']:.3f}); its top tokens {lens['top_tokens']}"
        )


def _crosscoder_sparse(built, fits, inputs, targets, split, icfg) -> dict | None:
    """The sparse IRM's selection on the crosscoder's change space (validate ablates it)."""
    from irmlens.irm.spaces import SPACES

    if "crosscoder_codes" not in built:
        return None
    cc_spec = SPACES["crosscoder_codes"]
    _, _, row = _sparse(
        built["crosscoder_codes"],
        targets,
        split,
        icfg,
        lambda j: cc_spec.feature_ref(j, inputs),
        fits["raw_difference"].heldout_kendall_tau,
    )
    log(
        f"irm: sparse crosscoder IRM (k={icfg.sparse_k}) tau {row['heldout_kendall_tau']:.3f}, "
        f"latents {row['features']}"
    )
    return row


def _paper(ctx: StudyContext, inputs, targets, split, rlhf_model) -> dict:
    """The paper's contrastive estimator on the shared dictionaries of every studied layer."""
    from irmlens.data.assets import asset_paths
    from irmlens.data.corpus import load_reviews
    from irmlens.irm.references import paper_reference

    hooks = [ctx.hook(la) for la in inputs.layers]
    return paper_reference(
        rlhf_model,
        ctx.pair.tokenizer,
        dict(zip(hooks, [s for s, _ in inputs.dictionaries["shared"]], strict=True)),
        [r.text for r in load_reviews(asset_paths().sentences)],
        targets,
        split,
        ctx.rm.word_utility,
        ctx.cfg.irm,
        neutral_near_zero=ctx.cfg.data.lexicon == "none",  # every frequent word is scored there
    )


def _log_scores(result, raw_tau: float, sparse, icfg) -> None:
    ci, controls = result.heldout_kendall_tau_ci, result.controls
    imp_tau = result.reference["model_implicit_reward"]["heldout_kendall_tau"]
    log(
        f"irm: {result.space} tau {result.heldout_kendall_tau:.3f} CI [{ci[0]:.3f}, "
        f"{ci[1]:.3f}]; raw difference {raw_tau:.3f}; model implicit reward {imp_tau:.3f}; "
        "controls: "
        + ", ".join(f"{k} {v['heldout_kendall_tau']:.3f}" for k, v in controls.items())
        + f"; sparse (k={icfg.sparse_k}) {sparse.heldout_kendall_tau:.3f} vs random "
        f"{controls['random_sae_sparse']['heldout_kendall_tau']:.3f}"
        f"; paper's estimator {result.paper_estimator['kendall_tau']:.3f}"
    )


def _result(ctx, inputs, targets, split, spec, chosen, main, sparse, chosen_feats):
    """The result's scores, feature tables and word tables (the caller adds the rest)."""
    from irmlens.irm.attribution import most_divergent, word_divergence
    from irmlens.irm.fit import top_irm_features
    from irmlens.irm.metrics import bootstrap_tau_ci
    from irmlens.irm.result import IRMResult

    icfg = ctx.cfg.irm

    def feature_ref(col: int) -> dict:
        return spec.feature_ref(col, inputs)

    held_words = targets.word[split.heldout_positions]
    div_words = word_divergence(
        main.heldout_irm, targets, chosen.held, held_words, main.model.coef, feature_ref
    )
    # the readable ranking: the sparse IRM's features in selection order, with their weights
    top_features = top_irm_features(  # every one of them: validate splits them by weight sign
        sparse.model,
        chosen.fit,
        chosen.held,
        targets,
        split,
        k=len(chosen_feats),
        features=chosen_feats,
    )
    for f in top_features:
        f.update(feature_ref(f["feature"]))
    label = inputs.labels[spec.dictionary]
    result = IRMResult(
        layer=inputs.layer,
        layers=inputs.layers,
        hook=ctx.hook(inputs.layer),
        space=spec.name,
        space_selection="best cross-validated R^2 on fit words"
        if icfg.space == "auto"
        else "configured",
        sae={"model": label, "width": ctx.width_of(label)},
        features=chosen.description,
        n_features=int(chosen.fit.shape[1]),
        n_dictionary_features=int(chosen.n_features),
        n_fit_words=len(split.fit_words),
        n_heldout_words=len(split.heldout_words),
        n_fit_positions=int(len(split.fit_positions)),
        n_heldout_positions=int(len(split.heldout_positions)),
        heldout_kendall_tau=main.heldout_kendall_tau,
        heldout_kendall_tau_ci=list(
            bootstrap_tau_ci(main.heldout_irm, targets.utility, seed=icfg.seed)
        ),
        heldout_spearman=main.heldout_spearman,
        heldout_spearman_ci=list(
            bootstrap_tau_ci(
                main.heldout_irm, targets.utility, seed=icfg.seed, statistic="spearman"
            )
        ),
        cv_r2=main.cv_r2,
        alpha=main.model.alpha,
        split_seed=icfg.seed,
        heldout_points=[
            {"word": targets.words[w], "true": targets.utility[w], "irm": v}
            for w, v in main.heldout_irm.items()
        ],
        top_features=top_features,
        divergent_words=most_divergent(div_words),
    )
    return result, div_words


def _other_hook_kinds(ctx: StudyContext, icfg) -> dict:
    """The IRM fitted on each cached hook kind after the studied one, on the same word split and
    its own dictionaries: its spaces, and the space chosen by the same rule (``irm.space``, or
    the best CV R^2 on fit words). Fitted before the studied kind's IRM, so that only one kind's
    activations are in memory at a time."""
    out = {}
    for kind in ctx.cfg.cache.hook_kinds[1:]:
        inputs, targets, split, _ = _inputs(ctx, kind)
        _, _, table, spec = _fit_spaces(inputs, targets, split, icfg)
        out[kind] = _hook_kind_row(ctx, kind, spec.name, table)
    return out


def _hook_kind_row(ctx: StudyContext, kind: str, space: str, table: list[dict]) -> dict:
    best = next(t for t in table if t["name"] == space)
    return {
        "space": space,
        "hook": ctx.hook(ctx.irm_layer, kind),
        **{k: best[k] for k in ("heldout_kendall_tau", "heldout_kendall_tau_ci", "cv_r2")},
        "spaces": table,
    }


def _implicit_by_word_id(ctx: StudyContext, targets) -> dict[int, float]:
    """Stage target's per-word implicit reward, keyed by the cache's word ids."""
    from irmlens.stages.target import read_implicit

    table = read_implicit(ctx.paths)
    return {i: table[w][0] for i, w in enumerate(targets.words) if w in table}


def _write(paths, main, targets, implicit: dict, div_words: list[dict], metrics: dict) -> None:
    """Every file of the stage, swapped in as one folder."""
    from safetensors.torch import save_file

    from irmlens.irm.words import WORD_UTILITIES, word_utilities_text

    wcounts = torch.bincount(targets.word, minlength=len(targets.words))
    word_rows = [
        (targets.words[w], split_name, targets.utility[w], v, implicit.get(w), int(wcounts[w]))
        for split_name, preds in (("fit", main.fit_irm), ("heldout", main.heldout_irm))
        for w, v in sorted(preds.items(), key=lambda kv: targets.words[kv[0]])
    ]
    with atomic_dir(paths.irm) as tmp:
        save_file(
            {"coef": main.model.coef.float(), "intercept": torch.tensor([main.model.intercept])},
            str(tmp / "coefficients.safetensors"),
        )
        atomic_write_text(tmp / WORD_UTILITIES.name, word_utilities_text(word_rows))
        atomic_write_json(tmp / "word_attribution.json", div_words)
        atomic_write_json(tmp / "metrics.json", metrics)


def outputs(paths) -> list[Path]:
    return [paths.irm]


def done(ctx: StudyContext) -> bool:
    return (ctx.paths.irm / "metrics.json").exists()

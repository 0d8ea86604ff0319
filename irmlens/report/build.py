"""Assemble report.json (schema v4, docs/report-schema.md) and a self-contained index.html from a
finished run folder."""

from __future__ import annotations

import html
import math
from pathlib import Path

from irmlens.io import atomic_write_json, atomic_write_text, csv_value, read_json, read_jsonl
from irmlens.irm.result import REPORTED
from irmlens.refs import card_ref, feature_anchor, feature_label
from irmlens.report.summary import (
    DIVERGENCE_NOTE,
    controls_text,
    divergence_sentence,
    target_terms,
    tau_bars,
    validation_verdict,
    verdict,
)
from irmlens.run import RunPaths
from irmlens.viz.card_html import render_card

SCHEMA_VERSION = 4


def _model_info(model_dir: Path, name: str, trust_remote_code: bool = False) -> dict:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    return {
        "name": name,
        "path": str(model_dir),
        "n_layers": int(c.num_hidden_layers),
        "d_model": int(c.hidden_size),
    }


def collect_report(run_dir: Path, cfg, dirs: dict[str, Path]) -> dict:
    paths = RunPaths(run_dir)
    summary_path = paths.rlhf_summary
    rlhf = read_json(summary_path) if summary_path.exists() else None  # None: a given pair
    layers = read_json(paths.layers_json)
    features = read_json(paths.features_json)
    from irmlens.cache.store import hook_kind

    saes = sorted(
        (read_json(p) for p in paths.saes.rglob("metrics.json")),
        key=lambda s: (
            hook_kind(s.get("hook")),
            s["layer"],
            s["width"],
            s["model"],
        ),
    )
    irm = read_json(paths.irm_metrics)
    validation = _validation(paths)
    base_name = (
        "tiny (embedded, pretrained by irmlens)"
        if cfg.model.base == "tiny"
        else str(cfg.model.base)
    )
    trust = cfg.model.trust_remote_code
    models = {"base": _model_info(dirs["base"], base_name, trust)}
    models["rlhf"] = _model_info(
        dirs["rlhf"], f"{base_name} + {rlhf['algorithm']}" if rlhf else str(cfg.model.rlhf), trust
    )
    if "null" in dirs:
        null_summary = paths.null_summary
        how = (
            f"{base_name} + {cfg.rlhf.algorithm} against the {cfg.null.reward} reward"
            if null_summary.exists()
            else str(cfg.model.null)
        )
        models["null"] = _model_info(dirs["null"], how, trust)
    rlhf_keys = (
        "algorithm",
        "steps",
        "reward_before",
        "reward_after",
        "kl",
        "samples",
        "trained_against",
        "hacking_signals",
    )
    return {
        "schema_version": SCHEMA_VERSION,
        "name": cfg.name,
        "models": models,
        "reward_model": _reward_model(cfg, rlhf, paths),
        "rlhf": {k: rlhf[k] for k in rlhf_keys} if rlhf else None,
        "layers": [
            {k: d[k] for k in ("layer", "divergence", "relative_divergence")}
            for d in layers["layers"]
        ],
        "studied_layers": layers["studied_layers"],
        "mmcs": read_json(paths.mmcs) if paths.mmcs.exists() else [],
        "saes": [
            {
                k: s.get(k)
                for k in (
                    "model",
                    "layer",
                    "hook",
                    "width",
                    "explained_variance",
                    "l0",
                    "dead_fraction",
                    "mse",
                    "architecture",
                    "ce_loss_recovered",
                )
            }
            for s in saes
        ],
        "feature_matching": features["feature_matching"],
        "feature_divergence": {
            k: features[k]
            for k in (
                "layer",
                "sae",
                "threshold",
                "score",
                "n_features",
                "ranking",
                "n_divergent",
                "n_divergent_null",
                "n_divergent_beyond_null",
            )
        },
        "divergent_features": features["divergent_features"],
        "divergent_words": irm["divergent_words"],
        "irm": {k: irm[k] for k in REPORTED if k in irm},  # older runs: no hook kinds
        "controls": irm["controls"],
        "paper_estimator": irm["paper_estimator"],
        "feature_cards": read_json(paths.cards) if paths.cards.exists() else [],
        "mediation": _mediation(paths),
        "validation": validation,
        "labels": _labels(paths),
        "crosscoder": _crosscoder(paths),
        "feature_spaces": feature_spaces(irm, validation),
        "timings": _timings(paths),
        "verification": verification(paths),
    }


def verification(paths: RunPaths) -> dict:
    """How the files this report was built from are known to be the ones their stages wrote:
    ``adopted`` lists the stages ``irmlens adopt`` recorded as it found them (a run made before
    completion records, or copied without them), with what it could check."""
    from irmlens.records import adopted_stages

    adopted = adopted_stages(paths.root)
    return {"verified": not adopted, "adopted": adopted}


def _crosscoder(paths: RunPaths) -> dict | None:
    """The crosscoder's training record and diffing measures (None: the study has none): its
    evals per model, and per pair (base vs rlhf, base vs null) the tag counts, the Δ histogram
    and every tuned-only latent with its decoder cosine and latent scaling."""
    diff_file = paths.diff / "crosscoder.json"
    if not diff_file.exists():
        return None
    diff = read_json(diff_file)
    record = next(iter(sorted(paths.saes.glob("crosscoder/*/*/training.json"))), None)
    training = read_json(record) if record else {}
    pairs = {}
    for name, p in diff["pairs"].items():
        pairs[name] = {
            "tag_counts": p["tag_counts"],
            "n_tuned_specific": p["n_tuned_specific"],
            "tuned_specific_latents": p["tuned_specific_latents"],
            "relative_norm_histogram": p["relative_norm_histogram"],
            "tuned_only": [
                {
                    "latent": j,
                    "relative_norm": p["relative_norm"][j],
                    "decoder_cosine": p["decoder_cosine"][j],
                    "nu_error": p["nu_error"][j],
                    "nu_reconstruction": p["nu_reconstruction"][j],
                }
                for j in p["tuned_only_latents"]
            ],
        }
    return {
        "layer": diff["layer"],
        "hook": diff["hook"],
        "width": diff["width"],
        "models": diff["models"],
        "architecture": training.get("architecture"),
        "k": training.get("k"),
        "evals": training.get("evals"),
        "thresholds": diff["thresholds"],
        "pairs": pairs,
    }


def space_dictionary(space: str) -> str:
    """What kind of dictionary the IRM space ``space`` reads, from its spec's basis kind
    (``other``: a space this process has not registered)."""
    from irmlens.bases import BASES
    from irmlens.irm.spaces import SPACES

    spec = SPACES.get(space)
    kind = BASES.get(spec.dictionary) if spec else None
    return kind.report_name if kind else "other"


def feature_spaces(irm: dict, validation: dict | None) -> list[dict]:
    """The dictionary kinds side by side: each IRM space's held-out tau and CI; the main space
    also carries its controls and the validation arms (which ablate and steer its features)."""
    rows = []
    for sp in irm["spaces"]:
        row = {
            "space": sp["name"],
            "dictionary": space_dictionary(sp["name"]),
            "n_features": sp["n_features"],
            "heldout_kendall_tau": sp["heldout_kendall_tau"],
            "heldout_kendall_tau_ci": sp["heldout_kendall_tau_ci"],
            "cv_r2": sp["cv_r2"],
            "main": sp["name"] == irm["space"],
        }
        if row["main"]:
            row["controls"] = {
                name: {k: c[k] for k in ("heldout_kendall_tau", "difference_ci") if k in c}
                for name, c in irm["controls"].items()
            }
            if validation:
                row["validation_arms"] = [
                    {k: a.get(k) for k in ("arm", "reward", "reward_ci", "share_of_gain")}
                    for a in validation["arms"]
                ]
        if sp["name"] == "crosscoder_codes" and irm.get("crosscoder_sparse"):
            row["sparse"] = {
                k: irm["crosscoder_sparse"][k]
                for k in ("k", "features", "heldout_kendall_tau", "heldout_kendall_tau_ci")
            }
            if validation and validation.get("crosscoder"):
                row["validation_arms"] = [
                    {k: a.get(k) for k in ("arm", "reward", "reward_ci", "share_of_gain")}
                    for a in validation["crosscoder"]["arms"]
                ]
                row["validation_findings"] = validation["crosscoder"]["findings"]
        rows.append(row)
    return rows


def _reward_model(cfg, rlhf: dict | None, paths: RunPaths) -> dict:
    """The RM the study is scored against, or (``data.lexicon = "none"``) the statement that none
    was given and the IRM explains the pair's own implicit reward."""
    if cfg.data.lexicon == "none":
        info = read_json(paths.target / "target.json")
        return {
            "name": "none given: the model-level implicit reward",
            "formula": "clip(sum of the words' implicit rewards (divided by their standard "
            "deviation) / 5, -10, 10) over the "
            f"{info['n_target_words']} words seen >= {info['min_count']} times; {info['definition']}",
            "true_reward_model": False,
            "target": info["role"],
        }
    return {
        "name": rlhf["reward_model"] if rlhf else str(cfg.data.lexicon),
        "formula": "clip(sum of word utilities / 5, -10, 10)",
        "true_reward_model": True,
        "target": "the reward model's word utilities",
    }


def _timings(paths: RunPaths) -> dict:
    """Each stage's seconds on its last completed run, in the order those runs finished, and the
    machine(s) it ran on (the report stage itself is running: its time is in the log's table)."""
    from irmlens.records import stage_timings

    rows = [r for r in stage_timings(paths.root) if r["stage"] != "report"]
    machines = []
    for r in rows:
        if r["machine"] and r["machine"] not in machines:
            machines.append(r["machine"])
    return {
        "stages": [{"stage": r["stage"], "seconds": r["seconds"]} for r in rows],
        "total_seconds": sum(r["seconds"] or 0.0 for r in rows),
        "machines": machines,
        "note": "seconds of each stage's last completed run; a stage done elsewhere (a resumed "
        "run, a given pair) has its own machine or none",
    }


def _mediation(paths: RunPaths) -> dict | None:
    """mediate/mediation.json (None: a run made before the stage existed)."""
    f = paths.mediate / "mediation.json"
    return read_json(f) if f.exists() else None


def _tokens(words) -> str:
    return html.escape(", ".join(repr(t) for t in words))


def _feature_link(f: dict, cards: frozenset) -> str:
    """A feature as (dictionary, layer, index), linked to its card where the report has one."""
    ref = (f["dictionary"], f["layer"], f["feature"])
    name = feature_label(*ref)
    if ref in cards:
        return f'<a href="#{feature_anchor(*ref)}">{html.escape(name)}</a>'
    return html.escape(name)


def _direction_html(rd: dict | None, cards: frozenset = frozenset()) -> str:
    """The layer's mean difference: the tokens it promotes and suppresses (and the null pair's),
    its decomposition into the shared dictionary's features, the contexts it moves most."""
    if not rd:
        return ""
    null = ""
    if "null_cosine" in rd:
        null = f"; its cosine with the null pair's mean difference is {rd['null_cosine']:.2f}"
        if "null" in rd:
            null += (
                f" (the null pair's, through the unembedding, promotes "
                f"{_tokens(rd['null']['unembedding']['promoted'])})"
            )
    parts = [
        f"<p>The reward direction, the mean RLHF &minus; base difference (norm {rd['norm']:.3g}), "
        f"read through the unembedding, promotes {_tokens(rd['unembedding']['promoted'])} and "
        f"suppresses {_tokens(rd['unembedding']['suppressed'])}; through the final norm it "
        f"promotes {_tokens(rd['final_norm']['promoted'])}{null}.</p>"
    ]
    fs = rd.get("features")
    if fs:
        cum = "; ".join(
            f"{c['n_features']}: {c['norm_share']:.0%} of its norm, {c['causal_share']:.0%} "
            "of the layer's gain"
            for c in fs["cumulative"]
        )
        top = ", ".join(
            f"{_feature_link(f, cards)} ({f['norm_share']:+.0%}, cos {f['cosine']:+.2f})"
            for f in fs["top"][:8]
        )
        parts.append(
            f"<p>Written by the {html.escape(fs['dictionary'])} dictionary's features (ranked by "
            f"their part of the direction), the top {cum}. Its top features: {top}.</p>"
        )
    if rd.get("contexts"):
        rows = "".join(
            f"<tr><td class='ctx'>{html.escape(c['context'])} <b style='background:#fe9'>"
            f"{html.escape(c['token'])}</b></td>"
            f"<td>{c['projection']:.3g}</td></tr>"
            for c in rd["contexts"][:6]
        )
        parts.append(
            "<table><tr><th>where the difference projects most on it (context, token)</th>"
            f"<th>projection</th></tr>{rows}</table>"
        )
    return "".join(parts)


def _comparison_html(comparison: dict) -> str:
    """The best dictionary minus the best other basis, with paired CIs."""
    out = []
    for direction, c in comparison.items():
        k8, area = c["at_8"], c["area"]
        out.append(
            f"{direction}: {html.escape(c['dictionary'])} minus {html.escape(c['other'])} "
            f"{k8['difference']:+.2f} {_ci(k8['ci'])} in faithfulness at k = 8, "
            f"{area['difference']:+.2f} {_ci(area['ci'])} on the area"
        )
    if not out:
        return ""
    return (
        "<p>The best dictionary against the best other basis (paired bootstrap over rows): "
        + "; ".join(out)
        + ".</p>"
    )


def _sweeps_html(mediation: dict) -> str:
    """Every text set and metric's headline: the gain, and the studied layers' share."""
    rows = []
    for s in mediation.get("sweeps", []):
        studied = mediation["studied"]["layers"]
        share = {r["site"]: r["removed"] for r in s["sites"]}
        by = ", ".join(
            f"layer {la} {share.get(f'blocks.{la}.hook_resid_post', float('nan')):.0%}"
            for la in studied
        )
        resolved = s.get("gain_resolved", True)
        gain = f"{s['base']:.4f} &rarr; {s['rlhf']:.4f}" + (
            f" (gain {_ci(s['gain_ci'])})" if "gain_ci" in s else ""
        )
        if "null" in s:
            gain += f"; the null model {s['null']:.4f}"
        tail = (
            f"<td>{by}</td><td>{s['final_norm_and_unembedding']:.0%}</td>"
            if resolved
            else "<td colspan=2>no gain resolved (its CI holds 0): no share to split</td>"
        )
        rows.append(
            f"<tr><td>{html.escape(s['text'].replace('_', ' '))}</td>"
            f"<td>{html.escape(s['metric'].replace('_', ' '))}</td><td>{gain}</td>{tail}</tr>"
        )
    if not rows:
        return ""
    return (
        "<table><tr><th>text</th><th>metric</th><th>base &rarr; RLHF</th><th>studied layers' "
        "share</th><th>final norm + unembedding</th></tr>" + "".join(rows) + "</table>"
    )


def mediation_html(
    mediation: dict | None, studied: list[int] | None = None, cards: frozenset = frozenset()
) -> str:
    """The opening section: where the gain lives by layer, and in which basis it is compact
    (figures drawn with the page's plotly, included once in its head)."""
    from irmlens.mediate.curves import share_at
    from irmlens.viz.figures import (
        faithfulness_curves_figure,
        mediation_waterfall_figure,
        say_why_if_empty,
    )

    if mediation is None:
        return "<h2>Where the reward lives</h2><p>This run has no mediate stage.</p>"

    def plot(fig) -> str:
        say_why_if_empty(fig, "the mediate stage measured no share here")
        return fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False})

    sweep = mediation["sweep"]
    sites = "".join(
        f"<tr><td>{html.escape(r['site'])}</td><td>{r['removed']:.0%} {_ci(r['removed_ci'])}</td>"
        f"<td>{r['reproduced']:.0%} {_ci(r['reproduced_ci'])}</td></tr>"
        for r in sweep["sites"]
    )
    tables = []
    for la, res in mediation["layers"].items():
        rows = []
        for name, c in res["bases"].items():
            cells = []
            for direction in ("removed", "reproduced"):
                cells += [f"{share_at(c[direction], k):.2f}" for k in (1, 8, 32)]
                cells += [f"{c[direction]['area']:.2f}", str(c[direction]["k_at_80"] or "&mdash;")]
            kind = "dictionary" if c["dictionary"] else "basis"
            rows.append(
                f"<tr><td>{html.escape(name)} ({kind})</td>"
                + "".join(f"<td>{x}</td>" for x in cells)
                + "</tr>"
            )
        irm = res.get("sparse_irm")
        note = (
            f"<p>The sparse IRM's {irm['n_features']} features at this layer: "
            f"{irm['removed']:.0%} removed, {irm['reproduced']:.0%} reproduced.</p>"
            if irm
            else ""
        )
        placed = res.get("validation_sets") or []
        if placed:
            note += (
                "<p>The validation's feature sets at this layer, patched exactly (share removed / "
                "reproduced): "
                + "; ".join(
                    f"{html.escape(p['set'])} ({p['n_features']}) {p['removed']:.0%} / "
                    f"{p['reproduced']:.0%}"
                    for p in placed
                )
                + ".</p>"
            )
        head = "".join(
            "".join(f"<th>{d} k={k}</th>" for k in (1, 8, 32)) + "<th>area</th><th>k for 80%</th>"
            for d in ("removed", "reproduced")
        )
        top = res.get("top_components")
        top_html = (
            f"<p>The most compact basis, {html.escape(top['basis'])}: its top components promote "
            + "; ".join(
                f"#{c['component']} ({_fmt(c['share'])} alone): "
                f"{_tokens(c['unembedding']['promoted'][:5])}"
                for c in top["components"]
            )
            + ".</p>"
            if top
            else ""
        )
        tables.append(
            f"<h3>Layer {html.escape(la)} ({html.escape(res['hook'])}): the layer's share moved "
            f"by the top k components</h3>{plot(faithfulness_curves_figure(res, la))}"
            f"{_comparison_html(res.get('comparison', {}))}"
            f"<table><tr><th>basis</th>{head}</tr>"
            + "".join(rows)
            + f"</table>{_direction_html(res.get('reward_direction'), cards)}{top_html}{note}"
        )
    st = mediation.get("studied") or {}
    warning = (
        f"<p style='color:#b00'><b>Warning:</b> {html.escape(st['warning'])}.</p>"
        if st.get("warning")
        else ""
    )
    return f"""<h2>Where the reward lives</h2>
<p><b>{html.escape(mediation["verdict"])}</b></p>{warning}
{plot(mediation_waterfall_figure(sweep, studied or []))}
<p>{html.escape(mediation["metric"])}: base {sweep["base"]:.4f}, RLHF {sweep["rlhf"]:.4f} on
{mediation["rows"]["measured"]} cached held-out rows. Removed: the base's activations patched into the RLHF model
at that site; reproduced: the RLHF model's patched into the base; shares of the gain with 95% bootstrap CIs over rows.</p>
{_sweeps_html(mediation)}
<details><summary>every site</summary><table><tr><th>site</th><th>share removed</th><th>share reproduced</th></tr>{sites}
<tr><td>final norm and unembedding</td><td>{sweep["final_norm_and_unembedding"]:.0%}</td><td></td></tr></table></details>
{"".join(tables)}
<p>Curves: components ranked by the size of their attribution, the top ones re-checked by real patches; a share
past 1 overshoots, and counts as unfaithful as falling short (area and k for 80% read 1 &minus; |1 &minus; share|).
PCA and the mean difference are fitted on {mediation["rows"]["fit"]} other rows.</p>"""


def _validation(paths: RunPaths) -> dict | None:
    """validate/validation.json as it is (None: a run made before the stage existed)."""
    f = paths.validate / "validation.json"
    return read_json(f) if f.exists() else None


def _labels(paths: RunPaths) -> dict | None:
    """The labels' summary: the comparison, each labeler's labels of the sparse IRM's features
    side by side (prompts and raw answers stay in labels/labels.json), the random selection's."""
    f = paths.labels / "labels.json"
    if not f.exists():
        return None
    found = read_json(f)

    def compact(rows: list[dict]) -> list[dict]:
        keep = ("layer", "feature", "label", "explanation", "scores")
        return [{k: r.get(k) for k in keep} for r in rows]

    return {
        "evidence": found["evidence"],
        "lexicon_config": found["lexicon_config"],
        "llm": found["llm"],
        "comparison": found["comparison"],
        "sets": {
            name: {labeler: compact(rows) for labeler, rows in per.items()}
            for name, per in found["sets"].items()
        },
        "seconds": found["seconds"],
    }


# where a non-finite value comes from, by the report section it sits in: (cause, fix)
_IRM_CAUSE = (
    "a rank correlation or fit was undefined, usually because too few held-out words occur "
    "in the cached text or a model's predictions are constant",
    "cache more text (cache.max_rows, data.n_heldout) or lower irm.heldout_fraction, then "
    "re-run `irmlens irm RUN_DIR --force`",
)
_SAE_CAUSE = (
    "an SAE's training diverged (its loss overflowed)",
    "lower sae.lr or sae.l1_coefficient and run the study into a new --out folder",
)
_DIFF_CAUSE = ("a per-feature statistic was undefined", "re-run `irmlens diff RUN_DIR --force`")
_NON_FINITE_CAUSES = {
    "rlhf": (
        "the RLHF run diverged (its reward or KL overflowed)",
        "lower rlhf.learning_rate or raise rlhf.kl_coef and run the study into a new --out folder",
    ),
    "saes": _SAE_CAUSE,
    "mmcs": _SAE_CAUSE,
    "irm": _IRM_CAUSE,
    "controls": _IRM_CAUSE,
    "paper_estimator": _IRM_CAUSE,
    "divergent_words": _IRM_CAUSE,
    "feature_divergence": _DIFF_CAUSE,
    "divergent_features": _DIFF_CAUSE,
    "feature_matching": _DIFF_CAUSE,
    "feature_cards": _DIFF_CAUSE,
    "validation": (
        "a validation arm's reward or perplexity was undefined",
        "re-run `irmlens validate RUN_DIR --force`",
    ),
    "labels": (
        "a label statistic was undefined",
        "re-run `irmlens labels RUN_DIR --force`",
    ),
}


def _check_finite(obj, where="report") -> None:
    if isinstance(obj, float) and not math.isfinite(obj):
        section = where.removeprefix("report.").split(".")[0].split("[")[0]
        cause, fix = _NON_FINITE_CAUSES.get(
            section,
            (
                "a stage produced an undefined number",
                "delete that stage's outputs in the run folder and re-run the study",
            ),
        )
        raise ValueError(f"{where} is {obj}: {cause}. Fix: {fix}.")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_finite(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _check_finite(v, f"{where}[{i}]")


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def feature_map_rows(run_dir: Path, report: dict, layer: int | None = None) -> list[dict]:
    """Every shared-SAE feature of ``layer`` (default: the IRM layer), named (dictionary, layer,
    feature), with its divergence numbers, IRM weight (where the IRM reads that layer), lexicon
    label and matching tag (the layer's features table + IRM coefficients), in feature order."""
    import csv

    from safetensors.torch import load_file

    from irmlens.irm.fit import irm_feature_weights

    paths = RunPaths(run_dir)
    layer = report["irm"]["layer"] if layer is None else layer
    with open(paths.features_table(layer), encoding="utf-8") as f:
        rows = [{k: csv_value(v) for k, v in r.items()} for r in csv.DictReader(f)]
    coef = load_file(str(paths.irm_coefficients))["coef"]
    weights = irm_feature_weights(report["irm"], coef, len(rows), layer)
    words = (
        {f["feature"]: f["top_words_increase"] for f in report["divergent_features"]}
        if layer == report["feature_divergence"]["layer"]
        else {}
    )
    labels = {}
    if (paths.labels / "labels.json").exists():
        labels = {
            x["local_feature"]: x
            for x in read_json(paths.labels / "labels.json")["all_features"]
            if x["layer"] == layer
        }
    out = []
    for r in rows:
        lab = labels.get(r["feature"], {})
        out.append(
            {"dictionary": "shared", "layer": layer}
            | r
            | {
                "irm_weight": weights.get(r["feature"]),
                "lexicon_label": lab.get("label"),
                "lexicon_mass": lab.get("lexicon_mass"),
                "lexicon_mean_utility": lab.get("mean_utility"),
                "top_words_increase": words.get(r["feature"], []),
            }
        )
    return out


def every_layers_feature_rows(run_dir: Path, report: dict) -> list[dict]:
    """``feature_map_rows`` of every layer with a features table (every studied layer)."""
    return [
        row
        for layer in sorted(report["studied_layers"])
        if RunPaths(run_dir).features_table(layer).exists()
        for row in feature_map_rows(run_dir, report, layer)
    ]


def _fit_points(run_dir: Path) -> list[dict]:
    from irmlens.irm.words import read_word_utilities

    return [
        {"word": r["word"], "true": r["true_utility"], "irm": r["irm_utility"]}
        for r in read_word_utilities(run_dir)
        if r["split"] == "fit"
    ]


def _unverified_html(report: dict) -> str:
    from irmlens.report.summary import verification_text

    text = verification_text(report)
    if text is None:
        return ""
    return (
        '<p style="border:2px solid #b00;padding:6px 10px;background:#fff4f4">'
        f"<b>Unverified.</b> {html.escape(text)}</p>\n"
    )


def timings_html(timings: dict | None) -> str:
    """The per-stage timing table (seconds of each stage's last completed run)."""
    if not timings:
        return ""
    total = timings["total_seconds"] or 0.0

    def share(seconds) -> str:
        return "" if seconds is None or not total else f"{seconds / total:.0%}"

    rows = "".join(
        f"<tr><td>{html.escape(t['stage'])}</td><td>{_fmt(t['seconds'])}</td>"
        f"<td>{share(t['seconds'])}</td></tr>"
        for t in timings["stages"]
    )
    machines = "; ".join(
        html.escape(
            f"{m['cpu']}, {m['cpu_count']} cores, AVX-512 {m['avx512']}, torch "
            f"{m['torch']} ({m['torch_threads']} threads), GPU {m['gpu']}"
        )
        for m in timings["machines"]
    )
    return f"""<h2>Stage timings</h2>
<p>Seconds of each stage's last completed run, {total:.0f} s in all; on {machines or "an unrecorded machine"}.</p>
<table><tr><th>stage</th><th>seconds</th><th>share</th></tr>{rows}</table>"""


def render_html(
    report: dict,
    metrics: list[dict],
    feature_rows: list[dict] | None = None,
    fit_points: list[dict] | None = None,
) -> str:
    from plotly.offline import get_plotlyjs

    from irmlens.viz.figures import (
        crosscoder_norm_figure,
        divergent_feature_map_figure,
        irm_scatter_figure,
        latent_scaling_figure,
        layer_divergence_figure,
        reward_curve_figure,
        sae_quality_figure,
        say_why_if_empty,
        steering_dose_figure,
        top_features_figure,
        validation_arms_figure,
        word_divergence_figure,
    )

    r, irm, ctrl = report["rlhf"], report["irm"], report["controls"]["shuffled_targets"]
    terms = target_terms(report)
    figs = [
        ("Layer divergence", layer_divergence_figure(report["layers"], report["studied_layers"])),
        *(
            [("RLHF", reward_curve_figure(metrics, r["reward_before"], r["reward_after"]))]
            if r
            else []
        ),
        ("SAE quality", sae_quality_figure(report["saes"])),
        (
            terms["versus"],
            irm_scatter_figure(
                irm["heldout_points"],
                irm["heldout_kendall_tau"],
                ctrl["heldout_kendall_tau"],
                fit_points=fit_points,
                bars=tau_bars(report),
                target=terms["target"],
                axis=terms["axis"],
            ),
        ),
        *(
            [("Divergent-feature map", divergent_feature_map_figure(feature_rows))]
            if feature_rows
            else []
        ),
        (
            "Over- and under-valued words",
            word_divergence_figure(report["divergent_words"], terms["target"]),
        ),
        ("The sparse IRM's features", top_features_figure(irm["top_features"])),
    ]
    cc = report.get("crosscoder")
    if cc:
        figs += [
            ("Crosscoder: decoder norms", crosscoder_norm_figure(cc)),
            ("Crosscoder: latent scaling", latent_scaling_figure(cc)),
        ]
    validation = report.get("validation")
    if validation:
        figs += [
            ("Validation: ablation", validation_arms_figure(validation)),
            ("Validation: steering", steering_dose_figure(validation)),
        ]
    parts = []
    for title, fig in figs:
        say_why_if_empty(fig, EMPTY_WHY.get(title, "the run wrote no values for it"))
        div = fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False})
        parts.append(f"<h2>{html.escape(title)}</h2>\n{div}")
    margin = irm["heldout_kendall_tau"] - ctrl["heldout_kendall_tau"]
    spread = ctrl.get("heldout_kendall_tau_std", 0.0)
    if margin > 2 * spread and margin > 0:
        shuffle_text = (
            f"is {margin:.3f} above this control (more than 2 of its standard deviations)"
        )
    else:
        shuffle_text = (
            f"is within 2 standard deviations of this control (difference {margin:+.3f}): "
            "<b>no finding yet</b>"
        )
    samples = "".join(
        f"<tr><td>{html.escape(s['prompt'])}</td><td>{html.escape(s['before'])}</td><td>{html.escape(s['after'])}</td></tr>"
        for s in (r["samples"] if r else [])
    )
    m = report["models"]
    if r:
        hs = r["hacking_signals"]
        rlhf_rows = f"""<tr><th>RLHF</th><td>{html.escape(r["algorithm"])}, {r["steps"]} steps against {html.escape(r["trained_against"])}: mean reward ({html.escape(report["reward_model"]["name"])}) {r["reward_before"]:.3f} &rarr; {r["reward_after"]:.3f}, KL {r["kl"]:.2f} nats/completion</td></tr>
<tr><th>reward-hacking signals</th><td>repetition rate {hs["repetition_rate_before"]:.3f} &rarr; {hs["repetition_rate_after"]:.3f}; fraction of lexicon words {hs["lexicon_fraction_before"]:.3f} &rarr; {hs["lexicon_fraction_after"]:.3f}</td></tr>"""
    else:
        rlhf_rows = (
            f"""<tr><th>RLHF model</th><td>given: {html.escape(m["rlhf"]["name"])}</td></tr>"""
        )
    fd, fm = report["feature_divergence"], report["feature_matching"]
    ref = irm["reference"]
    sp = irm["sparse"]
    paper = report["paper_estimator"]
    summary = f"""
<table class="kv">
<tr><th>base model</th><td>{html.escape(m["base"]["name"])} ({m["base"]["n_layers"]} layers, d_model {m["base"]["d_model"]})</td></tr>
{rlhf_rows}
<tr><th>null model</th><td>{html.escape(m["null"]["name"]) if "null" in m else "none"}</td></tr>
<tr><th>divergent features</th><td>{html.escape(divergence_sentence(fd))}</td></tr>
<tr><th>paired dictionaries (width {fm["width"]})</th><td>{fm["n_shared"]} shared, {fm["n_base_only"]} base-only, {fm["n_rlhf_only"]} RLHF-only at decoder cosine &ge; {fm["threshold"]}; median matched cosine {fm["cosine_quantiles"]["p50"]:.2f}</td></tr>
<tr><th>studied layers</th><td>{report["studied_layers"]}</td></tr>
<tr><th>IRM</th><td>layer {irm["layer"]}, space <b>{html.escape(irm["space"])}</b> ({html.escape(irm["space_selection"])}): {html.escape(irm["features"])}; {irm["n_fit_words"]} fit words, {irm["n_heldout_words"]} held-out words</td></tr>
<tr><th>held-out Kendall τ / Spearman ρ</th><td>{irm["heldout_kendall_tau"]:.3f} / {irm["heldout_spearman"]:.3f} (CV R² {irm["cv_r2"]:.3f})</td></tr>
<tr><th>verdict</th><td><b>{html.escape(verdict(irm, report["controls"]))}</b></td></tr>
<tr><th>validation verdict</th><td><b>{html.escape(validation_verdict(report.get("validation"), report.get("labels")))}</b></td></tr>
<tr><th>95% CI of τ (bootstrap over held-out words)</th><td>[{irm["heldout_kendall_tau_ci"][0]:.3f}, {irm["heldout_kendall_tau_ci"][1]:.3f}]</td></tr>
<tr><th>reference: ridge on raw activation differences</th><td>τ {ref["raw_difference"]["heldout_kendall_tau"]:.3f}; signal retention of the IRM {_fmt(irm["signal_retention"])}</td></tr>
<tr><th>reference: model-level implicit reward</th><td>τ {ref["model_implicit_reward"]["heldout_kendall_tau"]:.3f} (&beta; log &pi;<sub>RLHF</sub>/&pi;<sub>base</sub> per word: what the policy itself learned{"; here the target itself: no reward model was given" if ref["model_implicit_reward"].get("is_the_target") else ""})</td></tr>
{_rm_free_html(ref.get("rm_free_irm"))}{_lens_html(ref.get("activation_difference_lens"))}{_hook_kinds_html(irm.get("hook_kinds"))}{_crosscoder_html(report.get("crosscoder"))}
<tr><th>sparse IRM ({sp["k"]} features)</th><td>τ {sp["heldout_kendall_tau"]:.3f} [{sp["heldout_kendall_tau_ci"][0]:.3f}, {sp["heldout_kendall_tau_ci"][1]:.3f}], retention {_fmt(sp["signal_retention"])}; same selection on a random SAE {report["controls"]["random_sae_sparse"]["heldout_kendall_tau"]:.3f}</td></tr>
<tr><th>the paper's estimator</th><td>τ {paper["kendall_tau"]:.3f} on {paper["n_heldout_words"]} held-out words ({paper["n_examples"]} contrastive examples)</td></tr>
<tr><th>controls (τ; 95% CI of IRM τ minus control τ)</th><td>{controls_text(report["controls"])}</td></tr>
<tr><th>shuffled-target control τ / ρ</th><td>{ctrl["heldout_kendall_tau"]:.3f} / {ctrl["heldout_spearman"]:.3f} ± {ctrl.get("heldout_kendall_tau_std", 0.0):.3f} over {ctrl.get("n_shuffles", 1)} permutations &mdash; the IRM {shuffle_text}</td></tr>
</table>"""
    space_rows = "".join(
        f"<tr><td>{html.escape(x['name'])}</td><td>{html.escape(x['description'])}</td><td>{x['n_features']}</td>"
        f"<td>{x['heldout_kendall_tau']:.3f} [{x['heldout_kendall_tau_ci'][0]:.3f}, {x['heldout_kendall_tau_ci'][1]:.3f}]</td>"
        f"<td>{x['cv_r2']:.4f}</td><td>{_fmt(x['signal_retention'])}</td></tr>"
        for x in irm["spaces"]
    )
    spaces_html = (
        "<h2>IRM feature spaces (same split, same ridge)</h2><table><tr><th>space</th><th>features</th>"
        "<th>dims</th><th>held-out τ [95% CI]</th><th>CV R² (fit words)</th><th>retention</th></tr>"
        f"{space_rows}</table>"
    )
    word_rows = "".join(
        f"<tr><td>{html.escape(w['word'])}</td><td>{w['true']:.2f}</td><td>{w['irm']:.3f}</td><td>{w['divergence']:+.2f}</td></tr>"
        for w in report["divergent_words"]
    )
    words_html = (
        "<h2>Most over- and under-valued held-out words</h2><p>divergence = standardised IRM "
        f"minus standardised {html.escape(terms['target'])}</p><table><tr><th>word</th><th>{terms['target'].split()[0]}</th><th>IRM</th>"
        f"<th>divergence</th></tr>{word_rows}</table>"
    )
    feat_rows = "".join(
        f"<tr><td>{f['feature']}</td><td>{f['divergence']:.4f}</td><td>{_fmt(f.get('divergence_null'))}</td>"
        f"<td>{f['divergence_beyond_null']:+.4f}</td><td>{f['frequency_base']:.3f} &rarr; {f['frequency_rlhf']:.3f}</td>"
        f"<td>{f['mean_change']:+.3f}</td><td>{html.escape(', '.join(f['top_words_increase']))}</td></tr>"
        for f in report["divergent_features"][:20]
    )
    feats_html = (
        "<h2>Most divergent shared-SAE features</h2><p>"
        + html.escape(DIVERGENCE_NOTE)
        + "</p><table><tr><th>feature</th><th>divergence (RLHF)</th><th>divergence (null)</th>"
        "<th>beyond the null</th><th>firing frequency base &rarr; RLHF</th><th>mean change</th>"
        f"<th>words where it rises most</th></tr>{feat_rows}</table>"
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>irmlens report: {html.escape(report["name"])}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}}
.kv th{{background:#f4f4f4;width:16em}}.tok{{padding:0 1px;white-space:pre}}.ctx{{margin:2px 0;font-family:monospace}}
.ctxs{{display:flex;gap:2em}}.ctxs>div{{flex:1}}details.card{{border:1px solid #ddd;margin:6px 0;padding:4px 8px}}</style>
<script type="text/javascript">{get_plotlyjs()}</script></head>
<body><h1>irmlens report: {html.escape(report["name"])}</h1>
<p>{html.escape(terms["question"])}</p>
{_unverified_html(report)}
{glance_html(report)}
{mediation_html(report.get("mediation"), report["studied_layers"], _card_keys(report))}
{summary}
{"".join(parts)}
{spaces_html}
{validation_html(report.get("validation"), report.get("labels"))}
{words_html}
{feats_html}
<h2>Feature cards</h2>
<p>The IRM layer's most divergent features and the sparse IRM's features at every layer they sit, each named (dictionary, layer, index) (the full table of every studied layer: features.csv beside this page). {html.escape(_representation_text(report))}
Click a card to open it; token backgrounds show the feature's activation.</p>
{CARD_SEARCH_HTML if report.get("feature_cards") else "<p><i>no cards: the cards stage wrote none</i></p>"}
<div id="cards">{"".join(render_card(c) for c in report.get("feature_cards", []))}</div>
<h2>Samples before and after RLHF (same prompts, same seed)</h2>
<table><tr><th>prompt</th><th>base</th><th>RLHF</th></tr>{samples}</table>
{timings_html(report.get("timings"))}
<p><small>report schema v{report["schema_version"]}; generated by irmlens. All data is in report.json beside this page.</small></p>
</body></html>
"""


# what an empty figure of the page says (say_why_if_empty), by its title
EMPTY_WHY = {
    "The sparse IRM's features": "the sparse IRM selected no feature",
    "Over- and under-valued words": "no held-out word has both utilities",
    "Divergent-feature map": "no feature table was written",
    "Validation: ablation": "no ablation arm was measured",
    "Validation: steering": "no steering arm was measured",
}

# search the cards by token (where a feature fires, what it promotes or suppresses): plain
# script over each card's data-tokens, so it works offline in any browser
CARD_SEARCH_HTML = """<p><label>find cards by token <input id="card-search" type="search"
placeholder="e.g. great" oninput="searchCards(this.value)"></label> <span id="card-search-count"></span></p>
<script>function searchCards(q){q=q.trim().toLowerCase();let n=0;
for(const c of document.querySelectorAll('#cards > details.card')){
const hit=!q||c.dataset.tokens.split(' ').some(t=>t.includes(q));c.style.display=hit?'':'none';n+=hit;}
document.getElementById('card-search-count').textContent=q?n+' card(s) with a token containing \u201c'+q+'\u201d':'';}</script>"""


def glance_html(report: dict) -> str:
    """The page's first lines: what the tuning changed, where, which features matter and
    whether anything is a finding, one short sentence each (``summary.glance``), each feature
    linked to its card."""
    from irmlens.report.summary import glance

    items = "".join(
        f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in glance(report)
    )
    return f'<h2>At a glance</h2><ul class="glance">{items}</ul>'


def _representation_text(report: dict) -> str:
    """Which representation of these features the IRM reads (its space's), said beside the
    cards, which show codes."""
    from irmlens.irm.spaces import SPACES

    spec = SPACES.get(report["irm"]["space"])
    if spec is None:
        return ""
    what = {
        "pre": "encoder pre-activations",
        "codes": "codes",
        "codes+error": "codes and the SAE's error",
    }.get(spec.representation, spec.representation)
    return (
        f"The IRM ({report['irm']['space']}) reads their {what} (RLHF minus base); the cards "
        "show the codes (activations)."
    )


def _card_keys(report: dict) -> frozenset:
    """(dictionary, layer, feature) of every card the report shows."""
    return frozenset(card_ref(c) for c in report.get("feature_cards", []))


def _rm_free_html(row: dict | None) -> str:
    if row is None:
        return ""
    return (
        f"<tr><th>RM-free IRM (fitted to the implicit reward, scored against the RM)</th><td>τ "
        f"{row['heldout_kendall_tau']:.3f} {_ci(row['heldout_kendall_tau_ci'])}; IRM τ minus it "
        f"{_ci(row['difference_ci'])}</td></tr>\n"
    )


def _lens_html(row: dict | None) -> str:
    if row is None:
        return ""
    tops = html.escape(", ".join(row.get("top_tokens", [])))
    return (
        f"<tr><th>reference: activation difference lens (no dictionary)</th><td>τ "
        f"{row['heldout_kendall_tau']:.3f} {_ci(row['heldout_kendall_tau_ci'])} on "
        f"{row['n_heldout_words']} held-out words (the IRM on them "
        f"{row['irm_heldout_kendall_tau_same_words']:.3f}; IRM τ minus lens τ "
        f"{_ci(row['difference_ci'])}); its top tokens over each row's first positions: {tops}"
        + (
            f"; over every position: {html.escape(', '.join(row['top_tokens_all_positions']))}"
            if row.get("top_tokens_all_positions")
            else ""
        )
        + "</td></tr>\n"
    )


def _crosscoder_html(cc: dict | None) -> str:
    if cc is None:
        return ""
    ev = cc.get("evals") or {}
    per = "; ".join(
        f"{html.escape(m)} EV {e['explained_variance']:.3f}, CE recovered "
        f"{_fmt(e.get('ce_loss_recovered'))}"
        for m, e in ev.get("per_model", {}).items()
    )
    pairs = "; ".join(
        f"base vs {html.escape(m)}: {p['tag_counts']['tuned_only']} {html.escape(m)}-only, "
        f"{p['tag_counts']['base_only']} base-only, {p['tag_counts']['shared']} shared, "
        f"{p['n_tuned_specific']} confirmed by latent scaling"
        for m, p in cc["pairs"].items()
    )
    return (
        f"<tr><th>crosscoder ({html.escape(str(cc['architecture']))}, width {cc['width']}, "
        f"{len(cc['models'])} models)</th><td>L0 {_fmt(ev.get('l0'))}, dead "
        f"{_fmt(ev.get('dead_fraction'))}; {per}<br>{pairs}</td></tr>\n"
    )


def _hook_kinds_html(kinds: dict | None) -> str:
    if not kinds or len(kinds) < 2:
        return ""
    cells = "; ".join(
        f"{html.escape(k)}: {html.escape(r['space'])} τ {r['heldout_kendall_tau']:.3f} "
        f"{_ci(r['heldout_kendall_tau_ci'])}"
        for k, r in kinds.items()
    )
    return f"<tr><th>IRM per hook kind</th><td>{cells}</td></tr>\n"


def _ci(ci) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


_NO_PAPER = (
    "The paper's number was not measured: no held-out review is longer than "
    "validate.paper_prefix_words."
)


def _difference(d: dict | None) -> str:
    return "" if d is None else f"{d['mean']:+.3f} {_ci(d['ci'])}"


def _crosscoder_validation_html(cc: dict | None) -> str:
    """The crosscoder's arms: its sparse IRM's latents ablated (lockstep) and steered, beside
    matched random latents, and what the paired differences say."""
    if not cc:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(a['arm'])}</td><td>{a['n_features']}</td>"
        f"<td>{a['reward']:.3f} {_ci(a['reward_ci'])}</td><td>{_fmt(a.get('share_of_gain'))}</td>"
        f"<td>{_fmt(a.get('kl_to_unintervened'))}</td><td>{_fmt(a.get('perplexity'))}</td></tr>"
        for a in cc["arms"]
    )
    found = "".join(
        f"<li>{html.escape(f['text'])}: {f['mean']:+.3f} {_ci(f['ci'])}</li>"
        for f in cc["findings"]
    )
    return f"""<h3>Crosscoder latents</h3>
<p>The sparse crosscoder IRM's {len(cc["latents"])} latents at {html.escape(cc["hook"])}. Ablation: {html.escape(cc["ablation"])}.
Steering: {html.escape(cc["steering"])}.</p>
<table><tr><th>arm</th><th>latents</th><th>reward [95% CI]</th><th>share of gain</th><th>KL</th><th>perplexity</th></tr>{rows}</table>
<ul>{found}</ul>"""


def _lens_validation_html(lens: dict | None) -> str:
    """The activation difference lens's vector steered into the base model (no dictionary)."""
    if not lens:
        return ""
    arms = ", ".join(
        f"{a['reward']:.3f} {_ci(a['reward_ci'])} at scale {a['scale']:g}" for a in lens["arms"]
    )
    found = "".join(
        f"<li>{html.escape(f['text'])} (scale {f['scale']:g}): {f['mean']:+.3f} {_ci(f['ci'])}</li>"
        for f in lens["findings"]
    )
    return f"""<h3>Activation difference lens: steering</h3>
<p>The mean RLHF &minus; base activation over each cached row's first {lens["first_k"]} tokens at {html.escape(lens["hook"])}
(norm {lens["vector_norm"]:.3g}), added to the base model: reward {arms}.</p><ul>{found}</ul>"""


def validation_html(validation: dict | None, labels: dict | None) -> str:
    """The Validation section's tables: every arm, the paper's number, the labels."""
    if validation is None:
        return "<h2>Validation</h2><p>This run has no validate stage.</p>"
    rows = "".join(
        f"<tr><td>{html.escape(a['arm'])}</td><td>{a['n_features']}</td>"
        f"<td>{a['reward']:.3f} {_ci(a['reward_ci'])}</td><td>{_fmt(a.get('share_of_gain'))}</td>"
        f"<td>{_fmt(a.get('kl_to_unintervened'))}</td><td>{_fmt(a.get('perplexity'))}</td>"
        f"<td>{_difference(a.get('main_minus_this'))}</td>"
        f"<td>{html.escape(a.get('description') or '')}</td></tr>"
        for a in validation["arms"]
    )
    p = validation["paper"]
    paper = (
        f"""<p>The paper's number: reward of the RLHF model's continuations of {p["n_prefixes"]} held-out prefixes of {p["prefix_words"]} words,
{p["reward_before"]:.3f} {_ci(p["reward_before_ci"])} before and {p["reward_after"]:.3f} {_ci(p["reward_after_ci"])} after ablating the sparse IRM's features
(after &minus; before {p["after_minus_before"]["mean"]:+.3f} {_ci(p["after_minus_before"]["ci"])}).</p>"""
        if p
        else f"<p><b>{html.escape(validation.get('note') or _NO_PAPER)}</b></p>"
    )
    out = f"""<h2>Validation</h2>
<p>{validation["n_prompts"]} held-out prompts, the same sampling seed for every arm, {validation["max_new_tokens"]} new tokens;
ablation subtracts the features' decoded contributions in the RLHF model, steering adds their mean RLHF-minus-base change to the base model.
Share of gain: removed (ablation) or reproduced (steering). KL: of the intervened model to the unintervened one, nats per completion.
main &minus; this: the sparse IRM's arm minus this arm, paired over prompts (ablation: below 0 means the main arm removes more).</p>
<table><tr><th>arm</th><th>features</th><th>reward [95% CI]</th><th>share of gain</th><th>KL</th><th>perplexity</th><th>main &minus; this [95% CI]</th><th>set</th></tr>{rows}</table>
{paper}{_crosscoder_validation_html(validation.get("crosscoder"))}{_lens_validation_html(validation.get("activation_difference_lens"))}"""
    if labels is None:
        return out
    c = labels["comparison"]
    comp = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{html.escape(lab)}</td><td>{v['n']}</td>"
        f"<td>{v['counts']['positive']} / {v['counts']['negative']} / {v['counts']['unrelated']}</td>"
        f"<td>{_fmt(v['share_related'])}</td><td>{_fmt(v.get('sign_agreement'))}</td><td>{_fmt(v.get('auroc_abs_irm_weight'))}</td></tr>"
        for name, per in c.items()
        for lab, v in per.items()
        if isinstance(v, dict)
    )
    sp = labels["sets"]["sparse_irm"]
    llm = {(r["layer"], r["feature"]): r for r in sp.get("llm", [])}
    feat_rows = "".join(
        f"<tr><td>{r['layer']}</td><td>{r['feature']}</td><td>{html.escape(str(r['label']))}</td>"
        f"<td>{html.escape(r['explanation'])}</td>"
        + (
            f"<td>{html.escape(str(llm[(r['layer'], r['feature'])]['label']))}</td><td>{html.escape(llm[(r['layer'], r['feature'])]['explanation'])}</td>"
            if llm
            else ""
        )
        + "</tr>"
        for r in sp["lexicon"]
    )
    kappa = c["sparse_irm"].get("kappa_llm_lexicon")
    llm_head = "<th>LLM label</th><th>LLM description</th>" if llm else ""
    return (
        out
        + f"""<h3>Reward-relevance labels</h3>
<p>Evidence: {html.escape(labels["evidence"])} of the RLHF model on the cached text. Lexicon labeler: related when at least
{labels["lexicon_config"]["min_mass"]:.0%} of a feature's activation falls on lexicon words and their activation-weighted utility is at least
{labels["lexicon_config"]["min_utility"]} in size.{"" if not labels["llm"] else f" LLM labeler: {html.escape(labels['llm']['backend'])}; Cohen's kappa with the lexicon labeler {_fmt(kappa)}; on three features whose answer is known it gave {html.escape(str(labels['llm']['check']['expected_vs_answer']))}."}</p>
<table><tr><th>features</th><th>labeler</th><th>n</th><th>positive / negative / unrelated</th><th>share related</th><th>sign agreement with IRM weight</th><th>AUROC of |IRM weight| for related</th></tr>{comp}</table>
<table><tr><th>layer</th><th>feature</th><th>lexicon label</th><th>lexicon evidence</th>{llm_head}</tr>{feat_rows}</table>"""
    )


def build_report(run_dir: str | Path, cfg, dirs: dict[str, Path]) -> Path:
    run_dir = Path(run_dir)
    report = collect_report(run_dir, cfg, {k: Path(v) for k, v in dirs.items()})
    return write_report(run_dir, report, ("html", "json", "md", "csv"))


FORMATS = ("html", "json", "md", "csv")


def write_report(run_dir: Path, report: dict, formats=FORMATS) -> Path:
    """Write the requested exports under ``run_dir/report`` (each through a temp file + rename):
    index.html, report.json, summary.md, features.csv and words.csv. Returns index.html's path."""
    from irmlens.report.export import features_csv, to_markdown, words_csv

    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown report format(s) {unknown}; choose from {list(FORMATS)}")
    _check_finite(report)
    paths = RunPaths(run_dir)
    out = paths.report
    if "json" in formats:
        atomic_write_json(out / "report.json", report)
    rows = feature_map_rows(run_dir, report) if "html" in formats else []
    if "html" in formats:
        metrics = read_jsonl(paths.rlhf_metrics)
        atomic_write_text(
            out / "index.html", render_html(report, metrics, rows, _fit_points(run_dir))
        )
    if "md" in formats:
        atomic_write_text(out / "summary.md", to_markdown(report))
    if "csv" in formats:
        atomic_write_text(
            out / "features.csv", features_csv(every_layers_feature_rows(run_dir, report))
        )
        atomic_write_text(out / "words.csv", words_csv(run_dir))
    return out / "index.html"

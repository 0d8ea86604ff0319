"""docs/results.md from finished runs' report.json files: one column per run, one row per measure,
beside what the paper reports where its numbers are known, so the page cannot drift from the runs.

    python experiments/results.py runs/tiny runs/smollm2 --out docs/results.md

Every figure is read from ``RUN/report/report.json`` (and ``RUN/diff/layers.json`` is not needed:
the report holds it). A measure a run does not have (an older run, a study without a null pair)
is shown as "n/a".
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Callable
from pathlib import Path

NA = "n/a"
_DRAW = re.compile(r"_\d+(?=@|$)")  # matched_random_3, reward_logit_matched_0@1

# What Marks et al. (arXiv 2310.08164) used and report for their VADER task, from their code
# (github.com/apartresearch/Probing-Learned-Feedback-Patterns, commit e1f4c57). The tables' values
# (Kendall tau per model, reward before/after ablation, GPT-4 label counts) are images in every
# copy reachable offline, so they are "not available here" rather than guessed.
NOT_HERE = "not available offline (table image)"
PAPER: dict[str, str] = {
    "model": "Pythia-70m, Pythia-160m, GPT-Neo-125m",
    "rm": "VADER lexicon, clip(sum / 5, -10, 10) over spaCy tokens",
    "rlhf": "PPO (trl), lr 1e-6, batch 64, KL coefficient 0.5, IMDB prompts",
    "layers": "top 5 layers by parameter-norm difference",
    "hook": "MLP outputs",
    "saes": "tied L1 SAEs at 1x and 2x (probe on 1x), L1 1e-3, 3 epochs",
    "tau": NOT_HERE + "; their tau ranks token strings, negative words only (see below)",
    "ablation": NOT_HERE + " (1000 completions of 30-token prefixes)",
    "labels": NOT_HERE + " (GPT-4 labels)",
}

PROTOCOL = """\
## How this protocol differs from the paper's notebook

From the paper's code (`collection_linear_probe_data.ipynb`, `train_linear_probe.ipynb`,
`ablation_study.ipynb` at commit e1f4c57):

- **Target.** The paper's probe is fitted on contrastive triples (a positive, a negative and a
  neutral text that differ in one word): its target is the Euclidean distance between the positive
  (or negative) word's 1x-SAE features and the neutral variant's, concatenated over 5 layers, made
  negative for the negative word; predictions are rescaled to the VADER range by their 10th-90th
  percentiles, clamped and averaged per token. irmlens's main IRM regresses the RLHF-minus-base
  *feature-activation difference* at every word-ending position of held-out reviews on the word's
  utility (non-lexicon words: 0). The paper's contrastive estimator also runs on our split (row
  "the paper's estimator").
- **Split.** The paper splits *triples* at random (80/20, seed 42), so one word can be in both
  halves and a probe can score by remembering token identity. irmlens holds out *words*: every
  held-out word's positions are unseen in the fit, and τ is computed over held-out words only.
- **Score.** The paper's notebook calls `kendalltau` on lists of token strings (negative tokens
  only), which ranks the tokens alphabetically; irmlens ranks utilities.
- **Controls.** Every τ here has a bootstrap CI over held-out words and stands beside controls of
  the same construction (an untrained SAE, the base model alone, a null fine-tuning against a
  shuffled lexicon, shuffled targets) with the paired CI of the difference; the paper compares
  with an untrained linear-regression baseline.
- **Validation.** The paper zeroes the decoded features in MLP hooks and scores 30-token
  continuations before and after; irmlens reports that number too ("the paper's number") and
  compares each ablation and steering arm with matched random feature sets (firing frequency and
  removed variance) on the same held-out prompts (`validate.n_prompts`), paired.
"""


def _get(d, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d or d[k] is None:
            return default
        d = d[k]
    return d


def _f(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return NA
    return f"{x:.{digits}f}"


def _ci(ci) -> str:
    return NA if not ci else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def _tau(row: dict | None) -> str:
    if not row or row.get("heldout_kendall_tau") is None:
        return NA
    out = _f(row["heldout_kendall_tau"])
    if row.get("heldout_kendall_tau_ci"):
        out += " " + _ci(row["heldout_kendall_tau_ci"])
    if row.get("difference_ci"):
        out += f"; IRM minus it {_ci(row['difference_ci'])}"
    return out


def _pct(x) -> str:
    return NA if x is None else f"{100 * x:.1f}%"


Row = tuple[str, Callable[[dict], str], str]  # (measure, cell of a report, paper's cell)


def _setup_rows() -> list[Row]:
    def model(r):
        b = r["models"]["base"]
        return f"{b['name']} ({b['n_layers']} layers, d_model {b['d_model']})"

    def rlhf(r):
        x = r.get("rlhf")
        return NA if not x else f"{x['algorithm']}, {x['steps']} steps"

    def reward(r):
        x = r.get("rlhf")
        if not x:
            return "given pair"
        return f"{x['reward_before']:.3f} → {x['reward_after']:.3f}"

    def rm(r):
        m = r["reward_model"]
        return m["name"] + ("" if m.get("true_reward_model", True) else " (no RM given)")

    return [
        ("base model", model, PAPER["model"]),
        ("reward model", rm, PAPER["rm"]),
        ("RLHF", rlhf, PAPER["rlhf"]),
        ("reward before → after (held-out prompts)", reward, NA),
        ("KL to base (nats per completion)", lambda r: _f(_get(r, "rlhf", "kl"), 2), NA),
        (
            "model-level implicit reward, held-out τ",
            lambda r: _tau(_get(r, "irm", "reference", "model_implicit_reward")),
            NA,
        ),
        ("studied layers", lambda r: str(r["studied_layers"]), PAPER["layers"]),
        ("IRM hook", lambda r: str(_get(r, "irm", "hook", default=NA)), PAPER["hook"]),
    ]


def _sae_rows(reports: list[dict]) -> list[Row]:
    """One row per (dictionary, architecture, width in d_model, hook kind) of the IRM layer."""
    from irmlens.cache.store import hook_kind

    keys = []
    for r in reports:
        d = r["models"]["base"]["d_model"]
        for s in r["saes"]:
            if s["layer"] != r["irm"]["layer"]:
                continue
            kind = hook_kind(s.get("hook"))
            key = (s["model"].split("-")[0], s["architecture"], s["width"] / d, kind)
            if key not in keys:
                keys.append(key)

    def cell(key):
        def get(r):
            d = r["models"]["base"]["d_model"]
            for s in r["saes"]:
                kind = hook_kind(s.get("hook"))
                k = (s["model"].split("-")[0], s["architecture"], s["width"] / d, kind)
                if s["layer"] == r["irm"]["layer"] and k == key:
                    return (
                        f"EV {_f(s['explained_variance'])}, CE rec. "
                        f"{_f(s['ce_loss_recovered'])}, L0 {_f(s['l0'], 1)}"
                    )
            return NA

        return get

    return [
        (f"SAE {m} {a} {w:g}× {k} (IRM layer)", cell((m, a, w, k)), PAPER["saes"] if i == 0 else NA)
        for i, (m, a, w, k) in enumerate(keys)
    ]


def _irm_rows(reports: list[dict]) -> list[Row]:
    spaces = []
    for r in reports:
        for s in r["irm"]["spaces"]:
            if s["name"] not in spaces:
                spaces.append(s["name"])
    kinds = []
    for r in reports:
        for k in _get(r, "irm", "hook_kinds", default={}) or {}:
            if k not in kinds:
                kinds.append(k)
    controls = []
    for r in reports:
        for c in r["controls"]:
            if c not in controls:
                controls.append(c)

    def space(name):
        return lambda r: _tau(next((s for s in r["irm"]["spaces"] if s["name"] == name), None))

    def kind(k):
        def get(r):
            row = _get(r, "irm", "hook_kinds", k)
            return NA if not row else f"{row['space']}: {_tau(row)}"

        return get

    def control(name):
        def get(r):
            c = r["controls"].get(name)
            if c is None:
                return NA
            if name == "shuffled_targets":
                return f"{_f(c['heldout_kendall_tau'])} ± {_f(c.get('heldout_kendall_tau_std'))}"
            return _tau(c)

        return get

    def sparse(r):
        s = r["irm"]["sparse"]
        return f"k={s['k']}: {_tau(s)}"

    rows: list[Row] = [
        (
            "IRM held-out τ (main space)",
            lambda r: f"{r['irm']['space']}: {_tau(r['irm'])}",
            PAPER["tau"],
        ),
    ]
    rows += [(f"  space {n}", space(n), NA) for n in spaces]
    rows += [(f"  hook kind {k}", kind(k), NA) for k in kinds]
    rows += [
        (
            "reference: ridge on raw differences",
            lambda r: _tau(_get(r, "irm", "reference", "raw_difference")),
            NA,
        ),
        (
            "reference: RM-free IRM (fitted to the implicit reward), vs the RM",
            lambda r: _tau(_get(r, "irm", "reference", "rm_free_irm")),
            NA,
        ),
        (
            "reference: activation difference lens (no dictionary), held-out τ",
            _lens,
            NA,
        ),
        (
            "the paper's estimator on our split, τ",
            lambda r: _f(_get(r, "paper_estimator", "kendall_tau")),
            NA,
        ),
    ]
    rows += [(f"control {c}", control(c), NA) for c in controls]
    rows.append(("sparse IRM", sparse, NA))
    return rows


def _lens(r: dict) -> str:
    row = _get(r, "irm", "reference", "activation_difference_lens")
    if not row:
        return NA
    tops = ", ".join(row.get("top_tokens", [])[:5])
    return (
        f"{_tau(row)} on {row['n_heldout_words']} words (IRM on them "
        f"{_f(row['irm_heldout_kendall_tau_same_words'])}); top tokens: {tops}"
    )


def _crosscoder_rows() -> list[Row]:
    def quality(r):
        cc = r.get("crosscoder")
        if not cc:
            return NA
        ev = cc["evals"]
        per = "; ".join(
            f"{m} EV {_f(e['explained_variance'])}, CE rec. {_f(e.get('ce_loss_recovered'))}"
            for m, e in ev["per_model"].items()
        )
        arch = f"{cc['architecture']} k={cc['k']}" if cc["architecture"] == "batchtopk" else "L1"
        return f"{arch}, width {cc['width']}, L0 {_f(ev['l0'], 1)}, dead {_pct(ev['dead_fraction'])}: {per}"

    def tags(pair):
        def get(r):
            p = _get(r, "crosscoder", "pairs", pair)
            if not p:
                return NA
            c = p["tag_counts"]
            return (
                f"{c['tuned_only']} {pair}-only ({p['n_tuned_specific']} confirmed by latent "
                f"scaling), {c['base_only']} base-only, {c['shared']} shared, {c['dead']} dead"
            )

        return get

    return [
        ("crosscoder (IRM layer; base, RLHF, null)", quality, NA),
        ("  latents, base vs RLHF", tags("rlhf"), NA),
        ("  latents, base vs null (fine-tuning drift)", tags("null"), NA),
    ]


def _validation_rows(reports: list[dict]) -> list[Row]:
    arms = []  # matched random draws share one row: "ablate:matched_random_*"
    for r in reports:
        for a in _get(r, "validation", "arms", default=[]) or []:
            name = _DRAW.sub("_*", a["arm"])
            if a["kind"] != "baseline" and name not in arms:
                arms.append(name)

    def arm(name):
        def get(r):
            found = [
                a
                for a in _get(r, "validation", "arms", default=[])
                if _DRAW.sub("_*", a["arm"]) == name
            ]
            if not found:
                return NA
            if "*" in name:
                shares = sorted(a["share_of_gain"] for a in found)
                return (
                    f"{len(found)} draws: {_pct(shares[0])} to {_pct(shares[-1])} of the gain "
                    "(pooled comparison: findings)"
                )
            a = found[0]
            out = f"{_pct(a['share_of_gain'])} of the gain (reward {_f(a['reward'])} {_ci(a['reward_ci'])}"
            out += f", KL {_f(a['kl_to_unintervened'], 2)})"
            d = a.get("main_minus_this")
            if d:
                out += f"; main minus it {_ci(d['ci'])}"
            return out

        return get

    def findings(r):
        f = _get(r, "validation", "findings", default=None)
        if f is None:
            return NA
        hits = [x["text"] for x in f if x["finding"]]
        return f"{len(hits)} of {len(f)}" + (": " + "; ".join(hits) if hits else "")

    def paper(r):
        p = _get(r, "validation", "paper")
        if not p:
            return NA
        d = p["after_minus_before"]
        return (
            f"{_f(p['reward_before'])} → {_f(p['reward_after'])} (after − before "
            f"{_f(d['mean'])} {_ci(d['ci'])})"
        )

    rows: list[Row] = [
        (
            "validation: reward base / RLHF (held-out prompts)",
            lambda r: (
                f"{_f(_get(r, 'validation', 'reward_base'))} / "
                f"{_f(_get(r, 'validation', 'reward_rlhf'))} "
                f"({_get(r, 'validation', 'n_prompts')} prompts)"
            ),
            NA,
        )
    ]
    rows += [(f"  {a}", arm(a), NA) for a in arms]
    comparisons = []
    for r in reports:
        for f in _get(r, "validation", "findings", default=[]) or []:
            if (f["kind"], f["control"]) not in comparisons:
                comparisons.append((f["kind"], f["control"]))

    def comparison(kind, control):
        def get(r):
            for f in _get(r, "validation", "findings", default=[]) or []:
                if (f["kind"], f["control"]) == (kind, control):
                    verdict = "finding" if f["finding"] else "no finding"
                    return f"{_f(f.get('mean'))} {_ci(f.get('ci'))}: {verdict} ({f['text']})"
            return NA

        return get

    rows += [(f"  main minus {c} ({k}, paired)", comparison(k, c), NA) for k, c in comparisons]
    rows += [
        ("validation findings (paired CI excludes 0)", findings, NA),
        (
            "the paper's number: reward on prefixes before → after ablation",
            paper,
            PAPER["ablation"],
        ),
    ]
    return rows + _crosscoder_and_lens_validation_rows()


def _side_findings(section: str):
    """A validation section's paired comparisons (crosscoder arms, lens steering), one cell."""

    def get(r):
        found = _get(r, "validation", section, "findings", default=None)
        if not found:
            return NA
        return "; ".join(
            f"{x['kind']}{'@' + format(x['scale'], 'g') if x.get('scale') else ''} vs "
            f"{x['control']}: {_f(x['mean'])} {_ci(x['ci'])}"
            for x in found
        )

    return get


def _crosscoder_and_lens_validation_rows() -> list[Row]:
    def cc_arm(prefix):
        def get(r):
            arms = _get(r, "validation", "crosscoder", "arms", default=None)
            if not arms:
                return NA
            found = [a for a in arms if a["arm"].startswith(prefix)]
            if not found:
                return NA
            if "matched" in prefix:
                shares = sorted(a["share_of_gain"] for a in found if a["share_of_gain"] is not None)
                return (
                    f"{len(found)} draws: {_pct(shares[0])} to {_pct(shares[-1])} of the gain"
                    if shares
                    else NA
                )
            a = found[0]
            return (
                f"{_pct(a['share_of_gain'])} of the gain (reward {_f(a['reward'])} "
                f"{_ci(a['reward_ci'])}, KL {_f(a['kl_to_unintervened'], 2)})"
            )

        return get

    def lens(r):
        arms = _get(r, "validation", "activation_difference_lens", "arms", default=None)
        if not arms:
            return NA
        return "; ".join(
            f"@{a['scale']:g}: {_pct(a['share_of_gain'])} of the gain (reward {_f(a['reward'])} "
            f"{_ci(a['reward_ci'])}, KL {_f(a['kl_to_unintervened'], 2)})"
            for a in arms
        )

    return [
        (
            "validation, crosscoder: ablate its sparse IRM's latents (lockstep)",
            cc_arm("ablate:crosscoder_sparse"),
            NA,
        ),
        ("  ablate matched random latents", cc_arm("ablate:crosscoder_matched_random_"), NA),
        ("  ablate the RLHF-only latents", cc_arm("ablate:crosscoder_rlhf_only"), NA),
        ("  steer its sparse IRM's latents @1", cc_arm("steer:crosscoder_sparse"), NA),
        ("  steer matched random latents @1", cc_arm("steer:crosscoder_matched_random_"), NA),
        ("  crosscoder: paired comparisons", _side_findings("crosscoder"), NA),
        ("validation, activation difference lens: steer the base model", lens, NA),
        ("  lens: paired comparisons", _side_findings("activation_difference_lens"), NA),
    ]


def _label_rows() -> list[Row]:
    def share(set_name, labeler):
        def get(r):
            c = _get(r, "labels", "comparison", set_name, labeler)
            if not c:
                return NA
            return f"{_pct(c['share_related'])} related of {c['n']}" + (
                f", sign agreement {_f(c['sign_agreement'], 2)}"
                if c.get("sign_agreement") is not None
                else ""
            )

        return get

    return [
        ("labels: sparse IRM, lexicon labeler", share("sparse_irm", "lexicon"), NA),
        ("labels: sparse IRM, LLM labeler", share("sparse_irm", "llm"), PAPER["labels"]),
        (
            "labels: random-SAE selection, lexicon labeler",
            share("random_sae_sparse", "lexicon"),
            NA,
        ),
        ("labels: all shared features, lexicon labeler", share("all", "lexicon"), NA),
        (
            "labels: sparse crosscoder IRM's latents, lexicon labeler",
            share("crosscoder_sparse", "lexicon"),
            NA,
        ),
        (
            "labels: sparse crosscoder IRM's latents, LLM labeler",
            share("crosscoder_sparse", "llm"),
            NA,
        ),
        (
            "labels: random live crosscoder latents, lexicon labeler",
            share("crosscoder_random", "lexicon"),
            NA,
        ),
        (
            "labels: AUROC of |IRM weight| for related",
            lambda r: _f(_get(r, "labels", "comparison", "all", "lexicon", "auroc_abs_irm_weight")),
            NA,
        ),
        (
            "labels: Cohen's κ, LLM vs lexicon",
            lambda r: _f(_get(r, "labels", "comparison", "sparse_irm", "kappa_llm_lexicon")),
            NA,
        ),
    ]


def _mediation_rows(reports: list[dict]) -> list[Row]:
    """Where the reward lives (the mediate stage): the gain per text and metric, the layer sweep,
    and at the IRM layer every basis's share at k = 8, the best dictionary against the best other
    basis, the reward direction and the null pair's."""

    def sweep(text, metric):
        def get(r):
            s = next(
                x for x in r["mediation"]["sweeps"] if x["text"] == text and x["metric"] == metric
            )
            gain = f"{_f(s['base'], 4)} → {_f(s['rlhf'], 4)} (gain {_ci(s['gain_ci'])})" + (
                f", null model {_f(s['null'], 4)}" if "null" in s else ""
            )
            if not s.get("gain_resolved", True):
                return gain + ": not resolved, no share measured"
            by = ", ".join(
                f"{r_['site'].split('.')[1]}: {_pct(r_['removed'])}"
                for r_ in s["sites"]
                if r_["site"].endswith("resid_post")
            )
            return (
                f"{gain}; removed after block {by}; final norm + unembedding "
                f"{_pct(s['final_norm_and_unembedding'])}"
            )

        return get

    def at_irm_layer(r):
        return r["mediation"]["layers"][str(r["irm"]["layer"])]

    def basis(name):
        def get(r):
            c = at_irm_layer(r)["bases"][name]
            k8 = next(
                p for p in c["removed"]["curve"] if p["k"] == min(8, c["removed"]["n_components"])
            )
            return (
                f"{_f(k8['share'], 2)} removed at k = 8 (area {_f(c['removed']['area'], 2)}, "
                f"k for 80% {c['removed']['k_at_80'] or 'none'}); reproduced "
                f"{_f(next(p for p in c['reproduced']['curve'] if p['k'] == k8['k'])['share'], 2)}"
            )

        return get

    def comparison(r):
        out = []
        for direction, c in at_irm_layer(r)["comparison"].items():
            out.append(
                f"{direction}: {c['dictionary']} − {c['other']} {_f(c['at_8']['difference'], 2)} "
                f"{_ci(c['at_8']['ci'])} at k = 8, {_f(c['area']['difference'], 2)} "
                f"{_ci(c['area']['ci'])} on the area"
            )
        return "; ".join(out)

    def direction(r):
        rd = at_irm_layer(r)["reward_direction"]
        out = (
            f"promotes {', '.join(rd['unembedding']['promoted'][:8])}; suppresses "
            f"{', '.join(rd['unembedding']['suppressed'][:6])}"
        )
        fs = rd.get("features")
        if fs:
            out += "; shared SAE features writing it: " + ", ".join(
                f"{c['n_features']}: {_pct(c['norm_share'])} of its norm, "
                f"{_pct(c['causal_share'])} of the gain"
                for c in fs["cumulative"]
            )
        return out

    def null(r):
        rd = at_irm_layer(r)["reward_direction"]
        return (
            f"cosine with the RLHF direction {_f(rd['null_cosine'], 2)}; promotes "
            f"{', '.join(rd['null']['unembedding']['promoted'][:8])}"
        )

    names: list[str] = []
    for r in reports:
        try:
            names += [n for n in at_irm_layer(r)["bases"] if n not in names]
        except (KeyError, TypeError):
            pass
    rows: list[Row] = [
        (f"mediation: {t.replace('_', ' ')}, {m.replace('_', ' ')}", sweep(t, m), NA)
        for t in ("cached_rows", "own_completions")
        for m in ("expected_utility", "implicit_reward")
    ]
    rows += [
        ("mediation: verdict", lambda r: r["mediation"]["verdict"], NA),
        (
            "mediation: the studied layers' share",
            lambda r: (
                ", ".join(
                    f"layer {la} {_pct(v)}" for la, v in r["mediation"]["studied"]["layers"].items()
                )
                + (
                    f" (warning: {r['mediation']['studied']['warning']})"
                    if r["mediation"]["studied"]["warning"]
                    else ""
                )
            ),
            NA,
        ),
    ]
    rows += [(f"  IRM layer, basis {n}", basis(n), NA) for n in names]
    rows += [
        ("  IRM layer: best dictionary − best other basis (faithfulness)", comparison, NA),
        (
            "  IRM layer: the sparse IRM's features",
            lambda r: (
                f"{_pct(at_irm_layer(r)['sparse_irm']['removed'])} removed, "
                f"{_pct(at_irm_layer(r)['sparse_irm']['reproduced'])} reproduced "
                f"({at_irm_layer(r)['sparse_irm']['n_features']} features)"
            ),
            NA,
        ),
        ("  IRM layer: the reward direction (mean difference)", direction, NA),
        ("  IRM layer: the null pair's mean difference", null, NA),
    ]
    return rows


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def table(reports: list[dict]) -> str:
    rows = _setup_rows() + _mediation_rows(reports) + _sae_rows(reports) + _crosscoder_rows()
    rows += _irm_rows(reports)
    rows += _validation_rows(reports) + _label_rows()
    head = "| measure | " + " | ".join(r["name"] for r in reports) + " | paper |"
    lines = [head, "|" + "---|" * (len(reports) + 2)]
    for measure, cell, paper in rows:
        cells = []
        for r in reports:
            try:
                cells.append(cell(r))
            except (KeyError, TypeError, IndexError, StopIteration):
                cells.append(NA)
        if all(c == NA for c in cells) and paper == NA:
            continue
        lines.append("| " + " | ".join(_md_cell(x) for x in [measure, *cells, paper or NA]) + " |")
    return "\n".join(lines)


def top_features(report: dict, n: int = 10) -> str:
    """The sparse IRM's first ``n`` features with their weights, labels and top context."""
    cards = {(c["layer"], c["feature"]): c for c in report.get("feature_cards", [])}
    lines = [
        f"### {report['name']}: the sparse IRM's top features",
        "",
        "| dictionary | layer | feature | weight | lexicon label | LLM label | top RLHF context |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in report["irm"]["top_features"][:n]:
        shared = f.get("dictionary", "shared") == "shared"  # cards are the shared SAE's
        card = (
            cards.get((f.get("layer"), f.get("local_feature", f["feature"])), {}) if shared else {}
        )
        labels = card.get("labels") or {}
        ctx = (card.get("contexts_rlhf") or [None])[0]
        text = NA
        if ctx:  # tokens as they read in the text (their spaces included: cards' token_pieces)
            toks = list(ctx["tokens"])
            peak = toks[ctx["focus"]]
            lead = peak[: len(peak) - len(peak.lstrip())]
            toks[ctx["focus"]] = f"{lead}**{peak.strip()}**" if peak.strip() else peak
            text = "".join(toks).strip()
        lines.append(
            "| "
            + " | ".join(
                _md_cell(str(x))
                for x in (
                    f.get("dictionary", "shared"),
                    f.get("layer", NA),
                    f.get("local_feature", f["feature"]),
                    f"{f['weight']:+.3f}",
                    _get(labels, "lexicon", "label", default=NA),
                    _get(labels, "llm", "label", default=NA),
                    text,
                )
            )
            + " |"
        )
    return "\n".join(lines)


def _machine(m: dict | str) -> str:
    if isinstance(m, str):
        return m
    return (
        f"{m.get('cpu')}, {m.get('cpu_count')} cores, "
        f"{'with' if m.get('avx512') else 'without'} AVX-512, torch {m.get('torch')}"
        + (f", {m['gpu']}" if m.get("gpu") else "")
    )


def stage_times(reports: list[dict]) -> str:
    """Each stage's seconds in each run (``report.json`` ``timings``: its last completed run),
    with the machines they ran on: the one table the docs quote stage times from."""
    order: list[str] = []
    seconds: list[dict[str, float | None]] = []
    for r in reports:
        stages = (r.get("timings") or {}).get("stages", [])
        seconds.append({s["stage"]: s["seconds"] for s in stages})
        order += [s["stage"] for s in stages if s["stage"] not in order]
    lines = [
        "## Stage times",
        "",
        "Seconds of each stage's last completed run, from each report's `timings` (the report "
        "stage's own time is in the run's log), on the machines named below. 2-core machines "
        "differ up to 2x (with or without AVX-512): quote ratios, not seconds.",
        "",
        "| stage | " + " | ".join(r["name"] for r in reports) + " |",
        "|---|" + "---|" * len(reports),
    ]
    for stage in order:
        if all(sec.get(stage) is None for sec in seconds):
            continue  # a step with no time of its own (the config check)
        cells = [NA if sec.get(stage) is None else f"{sec[stage]:,.0f}" for sec in seconds]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    totals = [
        NA
        if not (r.get("timings") or {}).get("stages")
        else f"{r['timings']['total_seconds']:,.0f}"
        for r in reports
    ]
    lines.append("| **all stages** | " + " | ".join(totals) + " |")
    machines = [
        "; ".join(_machine(m) for m in (r.get("timings") or {}).get("machines") or []) or NA
        for r in reports
    ]
    lines.append("| machine | " + " | ".join(_md_cell(m) for m in machines) + " |")
    return "\n".join(lines)


def render(run_dirs: list[Path]) -> str:
    reports = [json.loads((d / "report/report.json").read_text()) for d in run_dirs]
    parts = [
        "# Results: the tiny default and SmolLM2 side by side",
        "",
        "Generated by `python experiments/results.py "
        + " ".join(str(d) for d in run_dirs)
        + " --out docs/results.md` from the runs' `report/report.json` files; do not edit by "
        "hand. τ is Kendall's τ between IRM and true utilities over *held-out words*, with its "
        '95% bootstrap CI; "IRM minus it" is the paired bootstrap CI of the main IRM\'s τ minus '
        "that row's τ. Validation shares are of the RLHF reward gain over the base model "
        "(ablation in the RLHF model removes, steering the base model reproduces).",
        "",
        table(reports),
        "",
        *[top_features(r) + "\n" for r in reports],
        stage_times(reports),
        "",
        PROTOCOL,
    ]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="finished run folders")
    ap.add_argument("--out", type=Path, help="write here (default: print)")
    args = ap.parse_args(argv)
    text = render(args.runs)
    if args.out:
        from irmlens.io import atomic_write_text

        atomic_write_text(args.out, text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Exports beside the HTML report: a Markdown summary (a paper appendix, a PR comment) and CSV
tables of features and words. Pure functions of report.json-shaped dicts and run files."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from irmlens.run import RunPaths


def _f(x, fmt: str = ".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def md_text(text: str) -> str:
    """Model or lexicon text as literal Markdown table-cell text: VADER has words like ``:|``,
    ``<3`` and ``*``; unescaped they would split cells or be read as HTML or emphasis."""
    import html

    text = html.escape(str(text), quote=False).replace("\n", " ").replace("\r", " ")
    return "".join("\\" + c if c in "\\`*_[]|#~" else c for c in text)


def md_code(text: str, cell: bool = False) -> str:
    """Text as a literal Markdown code span (HTML and emphasis are not read inside one): the fence
    is longer than any run of backticks in the text, and in a table ``cell`` a ``|`` is escaped
    (GFM splits cells before it reads code spans)."""
    text = str(text).replace("\n", " ").replace("\r", " ")
    if cell:
        text = text.replace("|", "\\|")
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _ci(ci) -> str:
    return "" if not ci else f" [{ci[0]:.3f}, {ci[1]:.3f}]"


def to_markdown(report: dict) -> str:
    """The study in one page of Markdown: set-up, verdict, IRM against references and controls,
    feature spaces, divergent features and words.

    Every string that comes from the config or the run (run name, model names and paths, RLHF
    algorithm, the reward model / lexicon name, feature-space and control names) goes through
    ``md_text`` (or ``md_code``), so a name like ``<script>`` stays literal text."""
    from irmlens.report.summary import (
        DIVERGENCE_NOTE,
        difference_reading,
        divergence_sentence,
        tau_bars,
        verdict,
        verification_text,
    )

    irm, m, r = report["irm"], report["models"], report["rlhf"]
    lines = [f"# irmlens: {md_text(report['name'])}", ""]
    unverified = verification_text(report)
    if unverified is not None:
        lines += [f"> **Unverified.** {md_text(unverified)}", ""]
    lines += [
        f"- **Base model**: {md_text(m['base']['name'])} ({m['base']['n_layers']} layers, d_model "
        f"{m['base']['d_model']})",
        f"- **RLHF model**: {md_text(m['rlhf']['name'])}",
    ]
    if "null" in m:
        lines.append(f"- **Null model**: {md_text(m['null']['name'])}")
    if r:
        lines.append(
            f"- **RLHF**: {md_text(r['algorithm'])}, {r['steps']} steps against "
            f"{md_text(r['trained_against'])}; "
            f"mean reward {r['reward_before']:.3f} → {r['reward_after']:.3f}, KL {r['kl']:.2f} "
            "nats/completion"
        )
    if report.get("mediation"):
        lines.append(f"- **Where the reward lives**: {md_text(report['mediation']['verdict'])}")
        warning = (report["mediation"].get("studied") or {}).get("warning")
        if warning:
            lines.append(f"- **Warning**: {md_text(warning)}")
    lines += [
        f"- **IRM**: layer {irm['layer']}, feature space {md_code(irm['space'])} "
        f"({md_text(irm['space_selection'])});"
        f" {irm['n_fit_words']} fit / {irm['n_heldout_words']} held-out words (split seed "
        f"{irm['split_seed']})",
        "",
        f"**Verdict**: {md_text(verdict(irm, report['controls']))}",
        "",
        "## Held-out Kendall τ",
        "",
        "| | kind | τ [95% CI] |",
        "|---|---|---|",
    ]
    for b in tau_bars(report):
        lines.append(
            f"| {md_text(b['name'])} | {md_text(b['kind'])} | {b['tau']:.3f}{_ci(b.get('ci'))} |"
        )
    lines += [
        "",
        f"Signal retention (IRM τ / raw-difference τ): {_f(irm['signal_retention'], '.2f')}; "
        f"sparse IRM ({irm['sparse']['k']} features): {_f(irm['sparse']['signal_retention'], '.2f')}.",
        "",
        "Paired bootstrap 95% CI of IRM τ − control τ:",
        "",
    ]
    for name, c in report["controls"].items():
        if "difference_ci" in c:
            lo, hi = c["difference_ci"]
            lines.append(
                f"- {md_text(name.replace('_', ' '))}: [{lo:.3f}, {hi:.3f}] "
                f"({difference_reading(lo, hi)})"
            )
    lines += [
        "",
        "## Feature spaces (same split, same ridge)",
        "",
        "| space | dims | τ [95% CI] | CV R² | retention |",
        "|---|---|---|---|---|",
    ]
    for sp in irm["spaces"]:
        lines.append(
            f"| {md_code(sp['name'], cell=True)} | {sp['n_features']} | {sp['heldout_kendall_tau']:.3f}"
            f"{_ci(sp['heldout_kendall_tau_ci'])} | {sp['cv_r2']:.4f} | "
            f"{_f(sp['signal_retention'], '.2f')} |"
        )
    fd, fm = report["feature_divergence"], report["feature_matching"]
    lines += [
        "",
        "## What changed",
        "",
        divergence_sentence(fd)
        + f". Paired dictionaries (width {fm['width']}): {fm['n_shared']} shared, "
        f"{fm['n_base_only']} base-only, {fm['n_rlhf_only']} RLHF-only (cosine ≥ {fm['threshold']}).",
        "",
        DIVERGENCE_NOTE,
        "",
        "| feature | divergence (RLHF) | divergence (null) | firing base → RLHF | words where it "
        "rises most |",
        "|---|---|---|---|---|",
    ]
    for f in report["divergent_features"][:10]:
        null = f.get("divergence_null")
        lines.append(
            f"| {f['feature']} | {f['divergence']:.4f} | {'—' if null is None else f'{null:.4f}'} "
            f"| {f['frequency_base']:.3f} → "
            f"{f['frequency_rlhf']:.3f} | {', '.join(md_text(w) for w in f['top_words_increase'])} |"
        )
    lines += [
        "",
        "## Most over- and under-valued held-out words",
        "",
        "| word | true | IRM | divergence |",
        "|---|---|---|---|",
    ]
    for w in report["divergent_words"]:
        lines.append(
            f"| {md_text(w['word'])} | {w['true']:.2f} | {w['irm']:.3f} | {w['divergence']:+.2f} |"
        )
    lines += _validation_markdown(report)
    lines += ["", f"*report.json schema v{report['schema_version']}, generated by irmlens.*", ""]
    return "\n".join(lines)


def _validation_markdown(report: dict) -> list[str]:
    """The Validation section: the verdict in words, every arm, the paper's number, labels."""
    from irmlens.report.summary import validation_verdict

    v, labels = report.get("validation"), report.get("labels")
    lines = ["", "## Validation", "", md_text(validation_verdict(v, labels))]
    if v is None:
        return lines
    lines += [
        "",
        f"{v['n_prompts']} held-out prompts, one sampling seed for every arm.",
        "",
        "| arm | features | reward [95% CI] | share of gain | KL | perplexity | main − this [95% CI] |",
        "|---|---|---|---|---|---|---|",
    ]
    for a in v["arms"]:
        d = a.get("main_minus_this")
        lines.append(
            f"| {md_code(a['arm'], cell=True)} | {a['n_features']} | {a['reward']:.3f}"
            f"{_ci(a['reward_ci'])} | {_f(a.get('share_of_gain'), '.2f')} | "
            f"{_f(a.get('kl_to_unintervened'))} | {_f(a.get('perplexity'), '.2f')} | "
            + ("" if d is None else f"{d['mean']:+.3f}{_ci(d['ci'])}")
            + " |"
        )
    p = v["paper"]
    lines += [
        "",
        md_text(
            v.get("note") or "The paper's number was not measured (validate.paper_prefix_words)."
        )
        if p is None
        else f"The paper's number: the RLHF model's reward on {p['n_prefixes']} prefixes of "
        f"{p['prefix_words']} words, {p['reward_before']:.3f} before and {p['reward_after']:.3f} "
        f"after ablating the sparse IRM's features (after − before "
        f"{p['after_minus_before']['mean']:+.3f}{_ci(p['after_minus_before']['ci'])}).",
    ]
    if labels:
        lines += [
            "",
            "| features | labeler | share related | sign agreement | AUROC |",
            "|---|---|---|---|---|",
        ]
        for name, per in labels["comparison"].items():
            for lab, c in per.items():
                if isinstance(c, dict):
                    lines.append(
                        f"| {md_text(name)} | {md_text(lab)} | {_f(c['share_related'], '.2f')} | "
                        f"{_f(c.get('sign_agreement'), '.2f')} | "
                        f"{_f(c.get('auroc_abs_irm_weight'), '.2f')} |"
                    )
    return lines


def csv_cell(v):
    """A spreadsheet-safe cell: text that a spreadsheet would run as a formula (it starts with
    ``=``, ``+``, ``-``, ``@``, a tab or a carriage return, and is not a number) gets a leading
    apostrophe, the OWASP rule; numbers and other text are unchanged. For the report's exports
    only: the tables irmlens reads back (diff/, irm/) keep every word as the lexicon spells it."""
    if isinstance(v, str) and v[:1] in ("=", "+", "-", "@", "\t", "\r"):
        try:
            float(v)
        except ValueError:
            return "'" + v
    return v


def features_csv(rows: list[dict]) -> str:
    """One row per shared-SAE feature of every studied layer, named by its ``dictionary``,
    ``layer`` and ``feature`` columns: divergence numbers, IRM weight, matching tag."""
    if not rows:
        return ""
    fields = [k for k in rows[0] if k != "top_words_increase"] + ["top_words_increase"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    for r in rows:
        row = {**r, "top_words_increase": " ".join(r.get("top_words_increase", []))}
        w.writerow({k: csv_cell(v) for k, v in row.items()})
    return buf.getvalue()


def words_csv(run_dir: Path) -> str:
    """One row per lexicon word: split, true and IRM utility, implicit reward, and (held-out words)
    the standardised divergence."""
    from irmlens.io import read_json
    from irmlens.irm.words import COLUMNS, read_word_utilities

    div = {w["word"]: w["divergence"] for w in read_json(RunPaths(run_dir).word_attribution)}
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[*COLUMNS, "divergence"])
    w.writeheader()
    for r in read_word_utilities(run_dir):
        row = {**r, "divergence": div.get(r["word"], "") if r["split"] == "heldout" else ""}
        w.writerow({k: csv_cell(v) for k, v in row.items()})
    return buf.getvalue()

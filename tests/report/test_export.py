"""irmlens.report.export: exported text that model and lexicon words cannot break."""

from irmlens.report.export import md_code, md_text, to_markdown


def test_markdown_cells_keep_words_literal():
    # VADER lexicon entries and tokens that would split a table cell, open an HTML tag or a link,
    # or turn into emphasis
    assert md_text(":|") == ":\\|"
    assert md_text("<3") == "&lt;3"
    assert md_text("<!--") == "&lt;!--"
    assert md_text("*bad*") == "\\*bad\\*"
    assert md_text("[x](y)") == "\\[x\\](y)"
    assert md_text("two\nlines") == "two lines"
    row = f"| {md_text('=|')} | 1.0 |"
    assert row.replace("\\|", "").count("|") == 3  # still a two-cell row


def test_a_non_finite_number_is_blamed_on_the_stage_it_came_from():
    import pytest

    from irmlens.report.build import _check_finite

    with pytest.raises(ValueError, match=r"report\.rlhf\.kl is nan: the RLHF run diverged"):
        _check_finite({"rlhf": {"kl": float("nan")}, "irm": {"tau": 0.3}})
    with pytest.raises(ValueError, match=r"report\.irm\.heldout_kendall_tau is nan: a rank corr"):
        _check_finite({"irm": {"heldout_kendall_tau": float("nan")}})
    with pytest.raises(ValueError, match=r"report\.saes\[0\]\.mse is inf: an SAE's training"):
        _check_finite({"saes": [{"mse": float("inf")}]})
    _check_finite({"irm": {"tau": 0.3}, "note": None})  # finite: passes


HOSTILE = "<script>alert(1)</script>"


def _report(name: str, lexicon: str, model: str) -> dict:
    """A report.json-shaped dict with just the keys to_markdown reads."""
    tau = {"heldout_kendall_tau": 0.4, "heldout_kendall_tau_ci": [0.3, 0.5]}
    return {
        "schema_version": 4,
        "name": name,
        "models": {
            "base": {"name": model, "path": model, "n_layers": 2, "d_model": 64},
            "rlhf": {"name": f"{model} + ppo", "path": model},
            "null": {"name": f"{model} + ppo against the zero reward", "path": model},
        },
        "reward_model": {"name": lexicon, "formula": "clip(sum of word utilities / 5, -10, 10)"},
        "rlhf": {
            "algorithm": "ppo",
            "steps": 10,
            "trained_against": lexicon,
            "reward_before": 0.1,
            "reward_after": 0.5,
            "kl": 1.2,
        },
        "irm": {
            **tau,
            "layer": 1,
            "space": "sae_codes",
            "space_selection": "best CV R² on the fit words",
            "n_fit_words": 70,
            "n_heldout_words": 30,
            "split_seed": 0,
            "signal_retention": 0.9,
            "sparse": {"k": 32, "signal_retention": 0.8, **tau},
            "reference": {"raw_difference": tau},
            "spaces": [
                {"name": "sae_codes", "n_features": 256, "cv_r2": 0.5, "signal_retention": 0.9}
                | {"heldout_kendall_tau": 0.4, "heldout_kendall_tau_ci": [0.3, 0.5]}
            ],
        },
        "controls": {
            "shuffled_targets": {"heldout_kendall_tau": 0.0, "heldout_kendall_tau_std": 0.05},
            "random_sae": {"heldout_kendall_tau": 0.1, "difference_ci": [0.2, 0.4]},
        },
        "paper_estimator": {"kendall_tau": 0.35},
        "feature_divergence": {
            "layer": 1,
            "threshold": 0.5,
            "n_features": 256,
            "n_divergent": 3,
            "n_divergent_null": 1,
        },
        "feature_matching": {
            "width": 256,
            "threshold": 0.7,
            "n_shared": 200,
            "n_base_only": 30,
            "n_rlhf_only": 26,
        },
        "divergent_features": [
            {
                "feature": 7,
                "divergence": 0.9,
                "frequency_base": 0.01,
                "frequency_rlhf": 0.2,
                "top_words_increase": ["<3", HOSTILE],
            }
        ],
        "divergent_words": [{"word": HOSTILE, "true": 2.0, "irm": 0.5, "divergence": 1.5}],
    }


def test_markdown_summary_escapes_config_strings():
    md = to_markdown(_report(HOSTILE, f"lex{HOSTILE}", f"/models/{HOSTILE}|`x`"))
    assert "<script" not in md.lower() and "<3" not in md
    assert md.startswith("# irmlens: &lt;script&gt;alert(1)&lt;/script&gt;\n")
    assert "against lex&lt;script&gt;" in md and "**Base model**: /models/&lt;script&gt;" in md
    assert "\\|\\`x\\`" in md  # a model path cannot split a line or open a code span
    assert "feature space `sae_codes`" in md and "| `sae_codes` | 256 |" in md
    # an ordinary run renders as before
    plain = to_markdown(_report("demo", "vader", "tiny"))
    assert plain.startswith("# irmlens: demo\n") and "steps against vader;" in plain


def test_code_spans_stay_literal():
    assert md_code("sae_codes") == "`sae_codes`"
    assert md_code("a`b") == "``a`b``"
    assert md_code("`x`") == "`` `x` ``"
    assert md_code("a|b", cell=True) == "`a\\|b`" and md_code("a|b") == "`a|b`"


def test_a_control_the_irm_loses_to_is_said_to_be_better_not_merely_excluding_0():
    from irmlens.report.summary import controls_text, difference_reading

    assert difference_reading(0.1, 0.3).endswith("the IRM scores higher")
    assert "significantly worse" in difference_reading(-0.089, -0.022)
    assert difference_reading(-0.1, 0.2) == "includes 0: no difference"
    report = _report("demo", "vader", "tiny")
    report["controls"]["random_sae_sparse"] = {
        "heldout_kendall_tau": 0.3,
        "difference_ci": [-0.089, -0.022],
    }
    md = to_markdown(report)
    assert "random sae sparse: [-0.089, -0.022] (excludes 0: the IRM scores lower" in md
    assert "significantly worse" in controls_text(report["controls"])


def test_every_mention_of_the_schema_version_is_the_one_written():
    """One schema version everywhere: the docs, the JSON Schema's title and the code name the
    version report.json carries."""
    import json
    import re
    from pathlib import Path

    from irmlens.report.build import SCHEMA_VERSION

    root = Path(__file__).resolve().parents[2]
    schema = json.loads((root / "irmlens/report/schema.json").read_text())
    assert schema["properties"]["schema_version"]["const"] == SCHEMA_VERSION
    files = [root / "README.md", *(root / "docs").glob("*.md"), *(root / "irmlens").rglob("*.py")]
    files.append(root / "irmlens/report/schema.json")
    found = {
        (str(f.relative_to(root)), int(v))
        for f in files
        for v in re.findall(r"schema v(\d+)", f.read_text(encoding="utf-8"))
    }
    assert found and {v for _, v in found} == {SCHEMA_VERSION}, sorted(found)

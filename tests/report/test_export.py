"""irmlens.report.export: exported text that model and lexicon words cannot break."""

from irmlens.report.export import md_text


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

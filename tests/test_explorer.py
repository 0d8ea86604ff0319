"""The Jupyter explorer's callbacks and the example notebook, on the planted run."""

from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def explorer(planted_run):
    from irmlens.explorer import Explorer

    return Explorer(planted_run)


def test_sort_and_filter_callbacks_change_the_table(explorer):
    df = explorer.features()
    # the diff stage's ranking: the change beyond the null pair's, the report's order
    key = list(df["divergence_beyond_null"])
    assert key == sorted(key, reverse=True)
    top = [f["feature"] for f in explorer.study.report["divergent_features"]]
    assert list(df["feature"][: len(top)]) == top
    explorer.on_sort({"new": "|IRM weight|"})
    w = explorer.features()["irm_weight"].abs().tolist()
    assert w == sorted(w, reverse=True)
    fd = explorer.study.report["feature_divergence"]
    explorer.on_filter({"new": fd["threshold"]})
    df = explorer.features()
    assert len(df) == fd["n_divergent"] > 0
    assert (df["divergence"] >= fd["threshold"]).all()
    assert f"{len(df)} features" in explorer.table_html.value
    explorer.on_filter({"new": 0.0})
    explorer.on_sort({"new": "beyond the null"})


def test_clicking_a_feature_opens_its_card(explorer):
    top = explorer.study.report["divergent_features"][0]["feature"]
    trace = explorer.figure.data[0]
    index = list(trace.customdata).index(top)
    explorer.on_point_click(trace, SimpleNamespace(point_inds=[index]))
    assert explorer.selected == top
    layer = explorer.study.report["feature_divergence"]["layer"]
    assert f'id="feature-shared-{layer}-{top}"' in explorer.card_html.value  # the full card
    assert "top contexts, RLHF" in explorer.card_html.value
    assert "samples from each quartile" in explorer.card_html.value
    # drawn offline: no script in the widget's HTML (it would not run), the histogram a widget
    assert "<script" not in explorer.card_html.value and "cdn" not in explorer.card_html.value
    assert [t.type for t in explorer.card_figure.data] == ["bar", "bar"]
    assert "fires on" in explorer.card_figure.data[1].name
    explorer.on_point_click(trace, SimpleNamespace(point_inds=[]))  # a click on nothing
    assert explorer.selected == top


def test_finding_cards_by_token(explorer):
    """A token a card's feature promotes finds that card, in the explorer and in the Study."""
    card = explorer.study.report["feature_cards"][0]
    token = next(t["token"].strip().lower() for t in card["promoted"] if t["token"].strip())
    found = explorer.study.find_cards(token)
    assert (card["layer"], card["feature"]) in set(
        zip(found["layer"], found["feature"], strict=True)
    )
    explorer.on_token({"new": token.upper()})
    assert f"{len(found)} card(s)" in explorer.token_html.value
    explorer.on_token({"new": "zzz-no-such-token"})
    assert "no card has a token" in explorer.token_html.value


def test_word_search_shows_attribution(explorer):
    held = explorer.study.report["divergent_words"][0]["word"]
    explorer.on_word({"new": held.upper()})
    assert f"<b>{held}</b> (heldout word)" in explorer.word_html.value
    assert "contribution" in explorer.word_html.value
    explorer.on_word({"new": "zzzunknown"})
    assert "is not a lexicon word" in explorer.word_html.value


def test_layer_picker_lists_studied_layers(explorer):
    assert explorer.layers == explorer.study.report["studied_layers"]
    explorer.on_layer({"new": explorer.layers[0]})
    assert f"layer {explorer.layers[0]}" in explorer.table_html.value


def test_example_notebook_executes(planted_run, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("IRMLENS_RUN", str(planted_run))
    nb = nbformat.read(ROOT / "docs" / "explore.ipynb", as_version=4)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs)

"""A feature is (dictionary, layer, index) everywhere (issue 31): the planted study studies both
layers with one IRM over both, so index j names two different features and every table, card,
chart and lookup must say which."""

import csv
import json

import pytest


@pytest.fixture(scope="module")
def study(planted_run):
    from irmlens.study import Study

    return Study.load(planted_run)


def test_the_planted_irm_reads_both_layers(study):
    irm = study.report["irm"]
    assert irm["space"] == "multi_layer_pre" and irm["layers"] == [0, 1]
    assert study.report["studied_layers"] == [0, 1]


def test_every_sparse_irm_feature_in_a_shared_dictionary_has_its_own_card(study):
    cards = study.report["feature_cards"]
    keys = [(c["dictionary"], c["layer"], c["feature"]) for c in cards]
    assert len(keys) == len(set(keys))
    refs = [r for r in study.report["irm"]["sparse"]["feature_refs"] if r["dictionary"] == "shared"]
    assert refs
    for ref in refs:
        key = ("shared", ref["layer"], ref["local_feature"])
        assert key in keys, key
        card = cards[keys.index(key)]
        assert "sparse-IRM" in card["reason"]
        # the card's IRM weight is the weight of that layer's column in the IRM
        assert card["irm_weight"] is not None
    # the divergent cards are the IRM layer's, named with it
    layer = study.report["feature_divergence"]["layer"]
    assert all(c["layer"] == layer for c in cards if c["reason"].startswith("divergent"))


def test_every_table_names_the_layer_and_dictionary(study, planted_run):
    features = study.features
    assert {"dictionary", "layer", "feature"} <= set(features.columns)
    assert set(features["layer"]) == {0, 1}
    # index j of layer 0 and index j of layer 1 are two rows, not one
    assert features.groupby(["layer", "feature"]).size().max() == 1
    with open(planted_run / "report" / "features.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {r["layer"] for r in rows} == {"0", "1"} and {r["dictionary"] for r in rows} == {
        "shared"
    }
    attribution = study.word_attribution
    assert {"dictionary", "layer", "feature", "column"} <= set(attribution.columns)
    d_sae = study.report["feature_divergence"]["n_features"]
    # the column of a multi-layer space is layer offset + index, and the table says which
    offset = attribution["layer"].map({0: 0, 1: d_sae})
    assert (attribution["column"] == offset + attribution["feature"]).all()
    for f in study.report["irm"]["top_features"]:
        assert {"dictionary", "layer", "local_feature"} <= set(f)


def test_the_report_names_features_by_dictionary_and_layer(study, planted_run):
    from irmlens.refs import feature_anchor, feature_label

    page = (planted_run / "report" / "index.html").read_text()
    for c in study.report["feature_cards"]:
        assert f'id="{feature_anchor("shared", c["layer"], c["feature"])}"' in page
    # the sparse IRM's chart labels its bars by (dictionary, layer, index), never a column
    top = study.report["irm"]["top_features"][0]
    label = feature_label(top["dictionary"], top["layer"], top["local_feature"])
    assert json.dumps(label)[1:-1] in page


def test_an_index_with_cards_at_two_layers_is_named_by_the_explorer(planted_run):
    from irmlens.explorer import Explorer

    explorer = Explorer(planted_run)
    card = explorer.study.report["feature_cards"][0]
    other = 1 - card["layer"]
    html = explorer.card(card["feature"], layer=card["layer"])
    assert 'id="' + f'feature-shared-{card["layer"]}-{card["feature"]}"' in html
    # the same index at the other layer is another feature: its own card or its table row
    html_other = explorer.card(card["feature"], layer=other)
    assert f"feature-shared-{card['layer']}-{card['feature']}" not in html_other
    assert f"layer {other}" in html_other


def test_one_ranking_of_top_irm_features_everywhere(study):
    top = study.top_features
    refs = study.report["irm"]["top_features"]
    assert list(top["feature"]) == [f["local_feature"] for f in refs]
    assert list(top["layer"]) == [f["layer"] for f in refs]
    ranked = study.features.dropna(subset=["sparse_irm_rank"]).sort_values("sparse_irm_rank")
    shared = top[top["dictionary"] == "shared"]
    assert list(zip(ranked["layer"], ranked["feature"], strict=True)) == list(
        zip(shared["layer"], shared["feature"], strict=True)
    )


def test_the_page_opens_on_the_study_at_a_glance(study, planted_run):
    from irmlens.report.summary import glance

    page = (planted_run / "report" / "index.html").read_text()
    lines = dict(glance(study.report))
    assert {"Which features", "Moved most beyond drift", "Finding?"} <= set(lines)
    # before the mediation section and the summary table; features named with their layer
    assert page.index("At a glance") < page.index("Where the reward lives") < page.index('"kv"')
    top = study.report["irm"]["top_features"][0]
    assert f"shared layer {top['layer']} #{top['local_feature']}" in lines["Which features"]
    assert lines["Finding?"].startswith("IRM held-out τ")


def test_the_api_names_one_feature_by_dictionary_layer_and_index(study):
    from irmlens.errors import IrmlensError

    card = study.report["feature_cards"][0]
    ref = (card["dictionary"], card["layer"], card["feature"])
    assert study.card(*ref) is card or study.card(*ref) == card
    contexts = study.top_contexts(*ref, model="base")
    assert len(contexts) == len(card["contexts_base"]) and "[[" in contexts["context"][0]
    row = study.feature(*ref)
    assert (row["layer"], row["feature"]) == ref[1:] and row["card"]["feature"] == ref[2]
    # the same index at the other layer is another feature: no card of this one is returned
    other = ("shared", 1 - card["layer"], card["feature"])
    if other not in {
        (c["dictionary"], c["layer"], c["feature"]) for c in study.report["feature_cards"]
    }:
        with pytest.raises(IrmlensError, match=f"layer {other[1]} #{other[2]} has no card"):
            study.card(*other)
    with pytest.raises(IrmlensError, match="not in the run's tables"):
        study.feature("shared", 0, 10**6)


def test_a_card_says_what_its_ablation_effect_and_the_irms_representation_mean(study, planted_run):
    from irmlens.viz.card_html import render_card

    card = dict(study.report["feature_cards"][0])
    card["ablation_effect"] = {"reward_change": 0.0, "ci": [-0.01, 0.02]}
    assert "no measurable effect alone (the CI spans 0" in render_card(card)
    card["ablation_effect"] = {"reward_change": -0.2, "ci": [-0.3, -0.1]}
    assert "ablating it alone lowers the reward" in render_card(card)
    card["ablation_effect"] = None
    assert "not measured (only the sparse IRM's features" in render_card(card)
    page = (planted_run / "report" / "index.html").read_text()
    assert "reads their encoder pre-activations (RLHF minus base); the cards show the codes" in page


def test_a_card_shows_density_quantile_samples_and_is_found_by_token(study, planted_run):
    """Beside its top contexts, a card samples each quartile band of its firings and states
    both models' activation density; the page's card search reads each card's tokens."""
    import html

    card = next(c for c in study.report["feature_cards"] if c["quantiles_rlhf"])
    ref = (card["dictionary"], card["layer"], card["feature"])
    samples = study.quantile_samples(*ref)
    assert list(samples["band"].unique()) == [b["band"] for b in card["quantiles_rlhf"]]
    assert (samples["activation"] >= samples["low"]).all()
    assert (samples["activation"] <= samples["high"]).all()
    page = (planted_run / "report" / "index.html").read_text()
    assert 'id="card-search"' in page and "function searchCards" in page
    density = 1 - card["histogram"]["zero_fraction_rlhf"]
    block = page[page.index(f'id="feature-{ref[0]}-{ref[1]}-{ref[2]}"') :]
    block = block[: block.index("</details>")]
    assert f"RLHF {density:.2%}" in block
    token = next(t["token"].strip().lower() for t in card["promoted"] if t["token"].strip())
    assert token in html.unescape(block.split('data-tokens="')[1].split('"')[0]).split(" ")

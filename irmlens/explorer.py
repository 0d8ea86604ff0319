"""``irmlens.explore(run_dir)``: a Jupyter explorer of a finished run (ipywidgets + plotly).

Pick a layer, sort and filter features, click a feature in the map to open its card (its
histogram drawn as a figure widget: a widget's HTML runs no scripts, so nothing is fetched from a
CDN), find cards by token, search a word to see its IRM utility and which features it comes
from. The state and the callbacks live in ``Explorer`` (plain methods, unit-tested); ``explore``
just builds and returns its widget.
"""

from __future__ import annotations

import html
from pathlib import Path

from irmlens.refs import card_ref, feature_label

SORT_KEYS = {
    "beyond the null": "divergence_beyond_null",  # the diff stage's ranking, signed
    "divergence": "divergence",
    "|IRM weight|": "irm_weight",
    "firing-frequency change": "frequency_change",
    "mean change": "mean_change",
}


class Explorer:
    def __init__(self, run_dir: str | Path, n_rows: int = 25) -> None:
        import ipywidgets as w
        import plotly.graph_objects as go

        from irmlens.study import Study

        self.study = Study.load(run_dir)
        self.n_rows = n_rows
        report = self.study.report
        self.irm_layer = report["irm"]["layer"]
        self.cards = {card_ref(c): c for c in report["feature_cards"]}
        self.layers = self.study.diff_layers() or [self.irm_layer]
        self.layer = self.irm_layer
        self.sort_by = "beyond the null"
        self.min_divergence = 0.0
        self.selected: int | None = None
        self.layer_box = w.Dropdown(options=self.layers, value=self.layer, description="layer")
        self.sort_box = w.Dropdown(options=list(SORT_KEYS), value=self.sort_by, description="sort")
        self.filter_box = w.FloatSlider(
            value=0.0, min=0.0, max=0.5, step=0.01, description="divergence ≥"
        )
        self.word_box = w.Text(placeholder="a word, e.g. great", description="word")
        self.token_box = w.Text(placeholder="a token, e.g. great", description="find cards")
        self.table_html = w.HTML()
        self.card_html = w.HTML()
        self.card_figure = go.FigureWidget()
        self.token_html = w.HTML()
        self.word_html = w.HTML()
        self.figure = go.FigureWidget()
        self.layer_box.observe(self.on_layer, names="value")
        self.sort_box.observe(self.on_sort, names="value")
        self.filter_box.observe(self.on_filter, names="value")
        self.word_box.observe(self.on_word, names="value")
        self.token_box.observe(self.on_token, names="value")
        self.refresh()

    # ------------------------------------------------------------------ state -> views

    def features(self):
        """The current layer's features, filtered by divergence and sorted by the chosen key."""
        df = self.study.features_of_layer(self.layer)
        df = df[df["divergence"] >= self.min_divergence]
        key = SORT_KEYS[self.sort_by]
        if key not in df or df[key].isna().all():
            key = "divergence_beyond_null"
        order = df[key] if key == "divergence_beyond_null" else df[key].abs()
        return df.reindex(order.sort_values(ascending=False, kind="stable").index)

    def refresh(self) -> None:
        df = self.features()
        cols = [
            c
            for c in (
                "feature",
                "divergence",
                "divergence_null",
                "divergence_beyond_null",
                "frequency_base",
                "frequency_rlhf",
                "mean_change",
                "irm_weight",
                "matching_tag",
            )
            if c in df
        ]
        self.table_html.value = f"<b>layer {self.layer}: {len(df)} features</b>" + df[cols].head(
            self.n_rows
        ).to_html(index=False, float_format=lambda x: f"{x:.4g}")
        y = "irm_weight" if "irm_weight" in df and df["irm_weight"].notna().any() else "divergence"
        with self.figure.batch_update():
            self.figure.data = []
            self.figure.add_scattergl(
                x=df["frequency_change"],
                y=df[y],
                mode="markers",
                customdata=df["feature"],
                hovertemplate="feature %{customdata}<extra></extra>",
                marker=dict(size=6, opacity=0.6),
            )
            self.figure.layout.xaxis.title = "change in firing frequency (RLHF − base)"
            self.figure.layout.yaxis.title = y.replace("_", " ")
            self.figure.layout.title = f"layer {self.layer}: click a feature to open its card"
        self.figure.data[0].on_click(self.on_point_click)

    def card(self, feature: int, layer: int | None = None, dictionary: str = "shared") -> str:
        """The card of feature (``dictionary``, ``layer``, ``feature``): the full card where the
        report has one, else its row of the layer's table. ``layer`` defaults to the layer
        shown; the answer always names the layer it read, and says so when other layers'
        cards hold a feature of that index."""
        from irmlens.viz.card_html import render_card

        layer = self.layer if layer is None else layer
        ref = (dictionary, layer, feature)
        others = [la for la in self.study.card_layers(dictionary, feature) if la != layer]
        note = (
            f"<p><i>index {feature} also has a card at layer {', '.join(map(str, others))}: "
            f"that is another feature (pass layer=...)</i></p>"
            if others
            else ""
        )
        if ref in self.cards:  # its histogram: card_figure (a widget's HTML runs no scripts)
            return note + render_card(self.cards[ref], histogram=False)
        if dictionary != "shared":
            return f"<p>{html.escape(feature_label(*ref))} has no card</p>" + note
        df = self.study.features_of_layer(layer)
        row = df[df["feature"] == feature]
        if row.empty:
            return f"<p>feature {feature} is not in layer {layer}'s table</p>" + note
        return (
            f"<h4>{html.escape(feature_label(*ref))} (no card: cards cover the IRM layer's most "
            "divergent features and the sparse IRM's features)</h4>"
            + note
            + row.to_html(index=False)
        )

    def show_card(self, feature: int, layer: int | None = None, dictionary: str = "shared") -> None:
        """Open a card: its HTML, and its activation histogram in the figure widget (empty when
        the feature has no card)."""
        from irmlens.viz.figures import feature_histogram_figure

        layer = self.layer if layer is None else layer
        self.selected = feature
        self.card_html.value = self.card(feature, layer, dictionary)
        card = self.cards.get((dictionary, layer, feature))
        fig = feature_histogram_figure(card) if card else None
        with self.card_figure.batch_update():
            self.card_figure.data = []
            if fig is not None:
                self.card_figure.add_traces(list(fig.data))
                self.card_figure.layout = fig.layout

    def find(self, token: str) -> str:
        """The cards with a token containing ``token`` (``Study.find_cards``), as a table."""
        if not token.strip():
            return ""
        found = self.study.find_cards(token)
        if found.empty:
            return f"<p>no card has a token containing <b>{html.escape(token.strip())}</b></p>"
        return f"<p>{len(found)} card(s):</p>" + found.to_html(index=False)

    def word(self, query: str) -> str:
        """A word's true and IRM utility, and its top contributing features (held-out words)."""
        q = query.strip().lower()
        if not q:
            return ""
        words = self.study.words
        hit = words[words["word"] == q]
        if hit.empty:
            return f"<p><b>{html.escape(q)}</b> is not a lexicon word of the cached text</p>"
        r = hit.iloc[0]
        out = (
            f"<p><b>{html.escape(q)}</b> ({r['split']} word): true utility {r['true_utility']:.2f},"
            f" IRM {r['irm_utility']:.3f}</p>"
        )
        attr = self.study.word_attribution
        rows = attr[attr["word"] == q]
        if not rows.empty:
            out += "<p>top features (coefficient × mean feature difference at the word):</p>"
            out += rows[["dictionary", "layer", "feature", "contribution"]].to_html(index=False)
        return out

    # ------------------------------------------------------------------ callbacks

    def on_layer(self, change) -> None:
        self.layer = change["new"]
        self.refresh()

    def on_sort(self, change) -> None:
        self.sort_by = change["new"]
        self.refresh()

    def on_filter(self, change) -> None:
        self.min_divergence = float(change["new"])
        self.refresh()

    def on_point_click(self, trace, points, selector=None) -> None:
        if not points.point_inds:
            return
        self.show_card(int(trace.customdata[points.point_inds[0]]), self.layer)

    def on_word(self, change) -> None:
        self.word_html.value = self.word(change["new"])

    def on_token(self, change) -> None:
        self.token_html.value = self.find(change["new"])

    def widget(self):
        import ipywidgets as w

        controls = w.HBox([self.layer_box, self.sort_box, self.filter_box])
        return w.VBox(
            [
                controls,
                self.figure,
                self.table_html,
                self.card_html,
                self.card_figure,
                self.token_box,
                self.token_html,
                self.word_box,
                self.word_html,
            ]
        )


def explore(run_dir: str | Path):
    """The explorer widget of a finished run (display it in a notebook cell)."""
    return Explorer(run_dir).widget()

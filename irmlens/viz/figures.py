"""Figures built from report.json-shaped dicts, usable in notebooks and in the HTML report."""

from __future__ import annotations

import plotly.graph_objects as go

from irmlens.refs import feature_label


def layer_divergence_figure(layers: list[dict], studied: list[int]) -> go.Figure:
    x = [d["layer"] for d in layers]
    colors = ["#d62728" if layer in studied else "#1f77b4" for layer in x]
    fig = go.Figure(
        go.Bar(
            x=x,
            y=[d["relative_divergence"] for d in layers],
            marker_color=colors,
            customdata=[d["divergence"] for d in layers],
            hovertemplate="layer %{x}<br>relative %{y:.4g}<br>absolute %{customdata:.4g}<extra></extra>",
        )
    )
    fig.update_layout(
        title="Layer divergence: sum of ||Δθ||_F / ||θ_base||_F (red = studied)",
        xaxis_title="layer",
        yaxis_title="relative weight change",
    )
    return fig


def reward_curve_figure(
    metrics: list[dict], reward_before: float, reward_after: float
) -> go.Figure:
    steps = [m["step"] for m in metrics if "reward_mean" in m]
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=steps,
            y=[m["reward_mean"] for m in metrics if "reward_mean" in m],
            name="train reward (mean)",
            mode="lines+markers",
        )
    )
    if any("kl" in m for m in metrics):
        fig.add_trace(
            go.Scatter(
                x=[m["step"] for m in metrics if "kl" in m],
                y=[m["kl"] for m in metrics if "kl" in m],
                name="KL to base (nats per completion)",
                mode="lines",
                yaxis="y2",
            )
        )
    fig.add_hline(
        y=reward_before, line_dash="dot", annotation_text=f"eval before {reward_before:.3f}"
    )
    fig.add_hline(
        y=reward_after, line_dash="dash", annotation_text=f"eval after {reward_after:.3f}"
    )
    fig.update_layout(
        title="RLHF: reward and KL per step",
        xaxis_title="step",
        yaxis_title="reward",
        yaxis2=dict(title="KL", overlaying="y", side="right", rangemode="tozero"),
    )
    return fig


def sae_quality_figure(saes: list[dict]) -> go.Figure:
    def kind(s: dict) -> str:  # "" for the residual stream (and runs before hook kinds)
        from irmlens.cache.store import hook_kind

        k = hook_kind(s.get("hook"))
        return "" if k == "resid_post" else f" {k}"

    labels = [f"{s['model']} layer {s['layer']}{kind(s)} width {s['width']}" for s in saes]
    fig = go.Figure()
    fig.add_trace(
        go.Bar(x=labels, y=[s["explained_variance"] for s in saes], name="explained variance")
    )
    fig.add_trace(go.Bar(x=labels, y=[s["dead_fraction"] for s in saes], name="dead fraction"))
    if all("ce_loss_recovered" in s for s in saes):
        fig.add_trace(
            go.Bar(x=labels, y=[s["ce_loss_recovered"] for s in saes], name="CE loss recovered")
        )
    fig.add_trace(
        go.Scatter(
            x=labels,
            y=[s["l0"] for s in saes],
            name="L0",
            mode="markers",
            yaxis="y2",
            marker=dict(size=12, symbol="diamond"),
        )
    )
    fig.update_layout(
        title="SAE quality (held-out positions)",
        barmode="group",
        xaxis=dict(tickangle=-35, automargin=True),  # one label per SAE, several words each
        yaxis_title="fraction",
        yaxis2=dict(title="L0", overlaying="y", side="right", rangemode="tozero"),
    )
    return fig


def irm_scatter_figure(
    points: list[dict],
    tau: float,
    control_tau: float,
    fit_points: list[dict] | None = None,
    bars: list[dict] | None = None,
    target: str = "true utility",
    axis: str = "true utility (lexicon)",
) -> go.Figure:
    """IRM vs the target per word (``target``/``axis``: the report's words for it, the reward
    model's utility or the pair's implicit reward): held-out words highlighted over the fit
    words (grey); with ``bars`` ({name, tau, ci?, kind}), a second panel puts the IRM's held-out
    tau beside its references and controls (the reference lines the scatter is judged against)."""
    from plotly.subplots import make_subplots

    fig = make_subplots(
        rows=1,
        cols=2 if bars else 1,
        column_widths=[0.62, 0.38] if bars else None,
        subplot_titles=(f"IRM vs {target}", "held-out Kendall τ") if bars else None,
    )

    def word_points(pts: list[dict], name: str, marker: dict) -> go.Scatter:
        return go.Scatter(
            x=[p["true"] for p in pts],
            y=[p["irm"] for p in pts],
            mode="markers",
            name=name,
            text=[p["word"] for p in pts],
            hovertemplate="%{text} (" + name + ")<br>" + target + " %{x:.2f}<br>IRM %{y:.3f}"
            "<extra></extra>",
            marker=marker,
        )

    if fit_points:
        fig.add_trace(
            word_points(fit_points, "fit words", dict(size=5, color="#bbbbbb", opacity=0.5)),
            row=1,
            col=1,
        )
    fig.add_trace(
        word_points(points, "held-out words", dict(size=7, color="#d62728", opacity=0.8)),
        row=1,
        col=1,
    )
    if bars:
        colors = {"main": "#d62728", "reference": "#2ca02c", "control": "#7f7f7f"}
        fig.add_trace(
            go.Bar(
                x=[b["tau"] for b in bars],
                y=[b["name"] for b in bars],
                orientation="h",
                marker_color=[colors.get(b["kind"], "#1f77b4") for b in bars],
                error_x=dict(
                    type="data",
                    symmetric=False,
                    array=[(b["ci"][1] - b["tau"]) if b.get("ci") else 0 for b in bars],
                    arrayminus=[(b["tau"] - b["ci"][0]) if b.get("ci") else 0 for b in bars],
                ),
                showlegend=False,
                hovertemplate="%{y}: τ %{x:.3f}<extra></extra>",
            ),
            row=1,
            col=2,
        )
        fig.update_yaxes(autorange="reversed", row=1, col=2)
    fig.update_layout(
        title=f"IRM vs {target} (held-out Kendall τ {tau:.3f}; shuffled-target control {control_tau:.3f})",
        height=520,
    )
    fig.update_xaxes(title_text=axis, row=1, col=1)
    fig.update_yaxes(title_text="IRM utility", row=1, col=1)
    return fig


def divergent_feature_map_figure(features: list[dict]) -> go.Figure:
    """Every feature of the shared dictionary: its divergence in the RLHF pair against the null
    pair's, with the diagonal (features on it changed as much under the null fine-tuning: drift;
    far above it: changed by RLHF alone), coloured by the paired dictionaries' matching tag;
    hover shows its IRM weight and the words where it rises most. Without a null model: the
    divergence against the change in firing frequency."""
    has_null = any(f.get("divergence_null") is not None for f in features)
    colors = {"shared": "#1f77b4", "base-only": "#ff7f0e", "rlhf-only": "#2ca02c"}
    fig = go.Figure()
    for tag in sorted({f.get("matching_tag", "shared") for f in features}):
        sub = [f for f in features if f.get("matching_tag", "shared") == tag]
        weights = [f.get("irm_weight") for f in sub]
        fig.add_trace(
            go.Scattergl(
                x=[f["divergence_null"] if has_null else f["frequency_change"] for f in sub],
                y=[f["divergence"] for f in sub],
                mode="markers",
                name=f"{tag} ({len(sub)})",
                customdata=[
                    [
                        f["feature"],
                        "none" if w is None else f"{w:+.4g}",
                        ", ".join(f.get("top_words_increase", [])[:5]),
                    ]
                    for f, w in zip(sub, weights, strict=True)
                ],
                hovertemplate="feature %{customdata[0]}<br>divergence (RLHF) %{y:.4f}"
                + ("<br>divergence (null) %{x:.4f}" if has_null else "<br>Δ firing %{x:.4f}")
                + "<br>IRM weight %{customdata[1]}<br>%{customdata[2]}<extra></extra>",
                marker=dict(size=7, color=colors.get(tag, "#7f7f7f"), opacity=0.6),
            )
        )
    if has_null:
        top = max([f["divergence"] for f in features] + [f["divergence_null"] for f in features])
        fig.add_trace(
            go.Scatter(
                x=[0, top],
                y=[0, top],
                mode="lines",
                name="as much as the null pair (drift)",
                line=dict(color="#888", dash="dash"),
                hoverinfo="skip",
            )
        )
    fig.update_layout(
        title="Divergent-feature map: RLHF pair against the null pair"
        if has_null
        else "Divergent-feature map (no null model: divergence against the firing change)",
        xaxis_title="divergence in the null pair (base → null)"
        if has_null
        else "change in firing frequency (RLHF − base)",
        yaxis_title="divergence in the RLHF pair (base → RLHF)",
        height=520,
    )
    return fig


def word_divergence_figure(words: list[dict], target: str = "true utility") -> go.Figure:
    """The most over- and under-valued held-out words: standardised IRM minus standardised truth."""
    ws = sorted(words, key=lambda w: w["divergence"])
    fig = go.Figure(
        go.Bar(
            x=[w["divergence"] for w in ws],
            y=[w["word"] for w in ws],
            orientation="h",
            marker_color=["#d62728" if w["divergence"] > 0 else "#1f77b4" for w in ws],
            customdata=[[w["true"], w["irm"]] for w in ws],
            hovertemplate="%{y}: divergence %{x:.2f}<br>" + target + " %{customdata[0]:.2f}, IRM "
            "%{customdata[1]:.3f}<extra></extra>",
        )
    )
    fig.update_layout(
        title="Most over-valued (red) and under-valued (blue) held-out words",
        xaxis_title=f"standardised IRM − standardised {target}",
        height=max(400, 22 * len(ws)),
    )
    return fig


def _has_points(trace) -> bool:
    for axis in ("x", "y", "z", "values"):
        values = getattr(trace, axis, None)
        if values is not None and len(values):
            return True
    return False


def say_why_if_empty(fig: go.Figure, why: str) -> go.Figure:
    """A figure with no point to draw says why in its middle (a blank frame reads as a bug)."""
    if not any(_has_points(t) for t in fig.data):
        fig.add_annotation(
            text=f"nothing to draw: {why}",
            showarrow=False,
            x=0.5,
            y=0.5,
            xref="paper",
            yref="paper",
        )
    return fig


def feature_histogram_figure(card: dict) -> go.Figure:
    """One feature's non-zero activations in the base and the RLHF model (same bins)."""
    h = card["histogram"]
    centers = [(a + b) / 2 for a, b in zip(h["edges"][:-1], h["edges"][1:], strict=True)]
    fig = go.Figure()
    for name, label, color in (("base", "base", "#1f77b4"), ("rlhf", "RLHF", "#d62728")):
        fig.add_trace(
            go.Bar(
                x=centers,
                y=h[name],
                name=f"{label} model: fires on {1.0 - h[f'zero_fraction_{name}']:.2%} of tokens",
                marker_color=color,
                opacity=0.6,
            )
        )
    if not sum(h["base"]) + sum(h["rlhf"]):
        fig.data = []
        say_why_if_empty(fig, "it fires on no cached token in either model")
    fig.update_layout(
        barmode="overlay",
        title=f"{feature_label(card.get('dictionary', 'shared'), card['layer'], card['feature'])}: "
        "activations when firing",
        xaxis_title="activation when firing",
        yaxis_title="tokens",
        legend=dict(orientation="h", y=-0.35),
        height=340,
        margin=dict(t=40, b=90, l=50, r=10),
    )
    return fig


def top_features_figure(features: list[dict]) -> go.Figure:
    """The sparse IRM's features in selection order (first = explains the most), with their
    standardised weight and the words where each feature's difference is largest."""
    feats = features[:20][::-1]
    xs = [f["standardised_weight"] for f in feats]
    span = max([abs(x) for x in xs] or [1.0])
    fig = go.Figure(
        go.Bar(
            x=xs,
            # each bar names its feature as (dictionary, layer, index): a multi-layer IRM's
            # column index (f814) named no feature a card or table knows
            y=[_top_feature_label(f) for f in feats],
            orientation="h",
            text=[", ".join(f["top_words"][:3]) for f in feats],
            textposition="outside",
            cliponaxis=False,
            hovertemplate="%{y}: standardised weight %{x:.3f}<br>top words: %{text}<extra></extra>",
        )
    )
    fig.update_layout(
        # the title on two lines and the x range widened for the outside labels: on one line
        # the title and the longest labels ran off the plot
        title="The sparse IRM's features (top: chosen first)<br><sup>bar: standardised weight; "
        "label: words with the largest mean feature difference</sup>",
        xaxis={"title": "standardised weight", "range": [-2.2 * span, 2.2 * span]},
        yaxis={"automargin": True},
        margin={"l": 140, "r": 40, "t": 80},
        height=600,
    )
    return fig


def _top_feature_label(f: dict) -> str:
    if "dictionary" not in f:  # a run written before features carried their reference
        return f"column {f['feature']}"
    return feature_label(f["dictionary"], f["layer"], f["local_feature"])


def validation_arms_figure(validation: dict) -> go.Figure:
    """Mean reward (95% CI over prompts) of the RLHF model with each feature set ablated, beside
    the unintervened base and RLHF models: the main arm should fall toward base, its controls not."""
    arms = [a for a in validation["arms"] if a["kind"] in ("baseline", "ablate")][::-1]
    fig = go.Figure(
        go.Bar(
            x=[a["reward"] for a in arms],
            y=[a["arm"] for a in arms],
            orientation="h",
            error_x={
                "type": "data",
                "symmetric": False,
                "array": [a["reward_ci"][1] - a["reward"] for a in arms],
                "arrayminus": [a["reward"] - a["reward_ci"][0] for a in arms],
            },
            marker_color=[
                "#888"
                if a["kind"] == "baseline"
                else "#d62728"
                if a.get("feature_set") == validation["main_arm"]
                else "#1f77b4"
                for a in arms
            ],
            hovertemplate="%{y}: reward %{x:.3f}<extra></extra>",
        )
    )
    fig.update_layout(
        title="Ablation in the RLHF model<br><sup>mean reward of completions, 95% CI over "
        "prompts; red: the sparse IRM's features</sup>",
        xaxis_title="mean reward",
        yaxis={"automargin": True},
        margin={"t": 80},
        height=max(360, 28 * len(arms) + 140),
    )
    return fig


def steering_dose_figure(validation: dict) -> go.Figure:
    """Mean reward of the base model steered along each set's mean RLHF change, by scale (the
    main set at every scale, controls at scale 1), with the base and RLHF levels."""
    steer = [a for a in validation["arms"] if a["kind"] == "steer" and "reward_ci" in a]
    main = sorted(
        (a for a in steer if a["feature_set"] == validation["main_arm"]), key=lambda a: a["scale"]
    )
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=[a["scale"] for a in main],
            y=[a["reward"] for a in main],
            error_y={
                "type": "data",
                "symmetric": False,
                "array": [a["reward_ci"][1] - a["reward"] for a in main],
                "arrayminus": [a["reward"] - a["reward_ci"][0] for a in main],
            },
            mode="lines+markers",
            name="sparse IRM's features",
        )
    )
    controls = [a for a in steer if a["feature_set"] != validation["main_arm"]]
    for i, a in enumerate(controls):  # spread sideways a little so the markers do not overlap
        fig.add_trace(
            go.Scatter(
                x=[a["scale"] + 0.02 * (i - (len(controls) - 1) / 2)],
                y=[a["reward"]],
                mode="markers",
                marker={"symbol": "x", "size": 8},
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": [a["reward_ci"][1] - a["reward"]],
                    "arrayminus": [a["reward"] - a["reward_ci"][0]],
                    "thickness": 1,
                },
                name=a["feature_set"],
            )
        )
    for name, y in (("base", validation["reward_base"]), ("RLHF", validation["reward_rlhf"])):
        fig.add_hline(y=y, line_dash="dot", annotation_text=name, annotation_position="right")
    fig.update_layout(
        title="Steering the base model<br><sup>mean reward vs scale of the added mean RLHF "
        "change; 95% CI over prompts</sup>",
        xaxis_title="steering scale",
        yaxis_title="mean reward",
        margin={"t": 80, "r": 60},
        height=480,
    )
    return fig


def crosscoder_norm_figure(crosscoder: dict) -> go.Figure:
    """The crosscoder's relative decoder norm Δ per latent (1: only the tuned model's decoder,
    0: only the base's), RLHF pair and null pair overlaid: RLHF-only latents mean something
    only where the null pair has fewer."""
    fig = go.Figure()
    colors = {"rlhf": "#d62728", "null": "#7f7f7f"}
    for name, pair in crosscoder["pairs"].items():
        h = pair["relative_norm_histogram"]
        centers = [(i + 0.5) / len(h) for i in range(len(h))]
        fig.add_trace(
            go.Bar(
                x=centers,
                y=h,
                name=f"base vs {name} ({pair['tag_counts']['tuned_only']} {name}-only)",
                marker_color=colors.get(name),
                opacity=0.6,
            )
        )
    t = crosscoder["thresholds"]
    for x in (t["base_only_max"], t["tuned_only_min"]):
        fig.add_vline(x=x, line_dash="dot", line_color="#444")
    fig.update_layout(
        barmode="overlay",
        title=f"Crosscoder decoder norms, layer {crosscoder['layer']} (width {crosscoder['width']})",
        xaxis_title="relative decoder norm Δ (0 base-only, 0.5 shared, 1 tuned-only)",
        yaxis_title="latents",
        yaxis_type="log",
    )
    return fig


def latent_scaling_figure(crosscoder: dict) -> go.Figure:
    """Latent scaling of the tuned-only latents (Minder et al., Fig. 3): ν_ε (how much of the
    latent the base model's error still holds: complete shrinkage) against ν_r (how much the
    base's reconstruction rebuilds it: decoupling); real tuned-specific latents sit near 0, 0."""
    fig = go.Figure()
    colors = {"rlhf": "#d62728", "null": "#7f7f7f"}
    for name, pair in crosscoder["pairs"].items():
        pts = [
            (t["latent"], t["nu_error"], t["nu_reconstruction"])
            for t in pair["tuned_only"]
            if t["nu_error"] is not None and t["nu_reconstruction"] is not None
        ]
        fig.add_trace(
            go.Scatter(
                x=[p[1] for p in pts],
                y=[p[2] for p in pts],
                mode="markers",
                name=f"{name}-only latents ({pair['n_tuned_specific']} confirmed)",
                marker=dict(color=colors.get(name), size=7, opacity=0.7),
                customdata=[p[0] for p in pts],
                hovertemplate="latent %{customdata}<br>ν_ε %{x:.3f}<br>ν_r %{y:.3f}<extra></extra>",
            )
        )
    t = crosscoder["thresholds"]
    fig.add_vline(x=t["nu_error_max"], line_dash="dot", line_color="#444")
    fig.add_hline(y=t["nu_reconstruction_max"], line_dash="dot", line_color="#444")
    fig.update_layout(
        title="Latent scaling of the tuned-only latents (near 0, 0: really tuned-specific)",
        xaxis_title="ν_ε (base error / tuned error β)",
        yaxis_title="ν_r (base reconstruction / tuned reconstruction β)",
    )
    return fig


def _site_label(site: str) -> str:
    """``blocks.3.hook_resid_post`` -> "after block 3"; the MLP and embedding sites alike."""
    parts = site.split(".")
    if site == "blocks.0.hook_resid_pre":
        return "embedding"
    if len(parts) == 3 and parts[2] == "hook_mlp_out":
        return f"MLP {parts[1]}"
    return f"after block {parts[1]}" if len(parts) == 3 else site


def mediation_waterfall_figure(sweep: dict, studied: list[int]) -> go.Figure:
    """Where the gain builds up: patching the base's residual stream into the RLHF model after
    block L removes the share carried up to L; each bar is what block L adds to it (studied
    layers in red), and the last is what the final norm and unembedding hold."""
    rows = [r for r in sweep["sites"] if r["site"].endswith("resid_post")]
    steps, before = [], 0.0
    for r in rows:
        steps.append(r["removed"] - before)
        before = r["removed"]
    labels = [_site_label(r["site"]) for r in rows] + ["final norm + unembedding"]
    text = [f"{s:+.0%}" for s in steps] + [f"{sweep['final_norm_and_unembedding']:+.0%}"]
    fig = go.Figure(
        go.Waterfall(
            x=labels + ["all of the gain"],
            y=steps + [sweep["final_norm_and_unembedding"], 0.0],
            measure=["relative"] * (len(steps) + 1) + ["total"],
            text=text + ["100%"],
            textposition="outside",
            increasing={"marker": {"color": "#2ca02c"}},
            decreasing={"marker": {"color": "#d62728"}},
            totals={"marker": {"color": "#7f7f7f"}},
            hovertemplate="%{x}: %{y:+.1%} of the gain<extra></extra>",
        )
    )
    for la in studied:
        fig.add_vrect(
            x0=la - 0.5,
            x1=la + 0.5,
            fillcolor="#d62728",
            opacity=0.08,
            line_width=0,
            annotation_text="studied",
            annotation_position="top left",
        )
    fig.update_layout(
        title="Where the gain builds up (share removed by patching the base's residual stream "
        "into the RLHF model after each block)",
        xaxis_title="site",
        yaxis_title="share of the RLHF gain",
        yaxis_tickformat=".0%",
        showlegend=False,
    )
    return fig


def faithfulness_curves_figure(layer: dict, name: str, direction: str = "removed") -> go.Figure:
    """Each basis's share of the layer's gain moved by its top k components (k on a log axis):
    dictionaries solid, other bases dashed, the random dictionary grey; the whole site's
    effect at 1; the sparse IRM's features as one point."""
    fig = go.Figure()
    for basis, c in layer["bases"].items():
        curve = c[direction]["curve"]
        dash = "solid" if c["dictionary"] else "dash"
        line = {"dash": dash} | ({"color": "#aaaaaa"} if basis == "random_sae" else {})
        fig.add_trace(
            go.Scatter(
                x=[p["k"] for p in curve],
                y=[p["share"] for p in curve],
                mode="lines+markers",
                name=basis,
                line=line,
                hovertemplate=f"{basis}: k %{{x}}, share %{{y:.2f}}<extra></extra>",
            )
        )
    irm = layer.get("sparse_irm")
    if irm:
        fig.add_trace(
            go.Scatter(
                x=[irm["n_features"]],
                y=[irm[direction]],
                mode="markers",
                marker={"symbol": "star", "size": 14, "color": "black"},
                name=f"the sparse IRM's {irm['n_features']} features",
            )
        )
    placed = [p for p in layer.get("validation_sets", []) if p["set"] != "sparse_irm"]
    if placed:
        fig.add_trace(
            go.Scatter(
                x=[p["n_features"] for p in placed],
                y=[p[direction] for p in placed],
                mode="markers",
                marker={"symbol": "x", "size": 9, "color": "#555555"},
                text=[p["set"] for p in placed],
                hovertemplate="%{text}: %{x} features, share %{y:.2f}<extra></extra>",
                name="the validation's other feature sets",
            )
        )
    fig.add_hline(y=1.0, line_dash="dot", annotation_text="the whole site")
    fig.update_layout(
        title=f"Layer {name}: share of the layer's gain {direction} by the top k components",
        xaxis_title="k (components patched, ranked by attribution)",
        xaxis_type="log",
        yaxis_title=f"share {direction}",
        legend_title="basis (dashed: not a dictionary)",
    )
    return fig

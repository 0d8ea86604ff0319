"""Figures built from report.json-shaped dicts, usable in notebooks and in the HTML report."""

from __future__ import annotations

import plotly.graph_objects as go


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
    labels = [f"{s['model']} L{s['layer']} w{s['width']}" for s in saes]
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
        yaxis_title="fraction",
        yaxis2=dict(title="L0", overlaying="y", side="right", rangemode="tozero"),
    )
    return fig


def irm_scatter_figure(points: list[dict], tau: float, control_tau: float) -> go.Figure:
    fig = go.Figure(
        go.Scatter(
            x=[p["true"] for p in points],
            y=[p["irm"] for p in points],
            mode="markers",
            text=[p["word"] for p in points],
            hovertemplate="%{text}<br>true %{x:.2f}<br>IRM %{y:.3f}<extra></extra>",
            marker=dict(size=7, opacity=0.7),
        )
    )
    fig.update_layout(
        title=f"IRM vs true utility on held-out words (Kendall τ {tau:.3f}; shuffled-target control {control_tau:.3f})",
        xaxis_title="true utility (lexicon)",
        yaxis_title="IRM utility",
    )
    return fig


def top_features_figure(features: list[dict]) -> go.Figure:
    feats = features[:20][::-1]
    fig = go.Figure(
        go.Bar(
            x=[f["standardised_weight"] for f in feats],
            y=[f"f{f['feature']}" for f in feats],
            orientation="h",
            text=[", ".join(f["top_words"][:3]) for f in feats],
            textposition="outside",
            hovertemplate="%{y}: standardised weight %{x:.3f}<br>top words: %{text}<extra></extra>",
        )
    )
    fig.update_layout(
        title="Top IRM features (standardised ridge weight; label = words with largest mean Δf)",
        xaxis_title="standardised weight",
        height=600,
    )
    return fig

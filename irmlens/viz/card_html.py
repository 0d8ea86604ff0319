"""A feature card as a self-contained HTML fragment: used by the HTML report and the Jupyter
explorer (so neither imports the other)."""

from __future__ import annotations

import html

from irmlens.refs import card_ref, feature_anchor, feature_label


def _highlight(ctx: dict, scale: float) -> str:
    spans = []
    for i, (t, a) in enumerate(zip(ctx["tokens"], ctx["activations"], strict=True)):
        alpha = 0.0 if scale <= 0 else min(1.0, max(0.0, a / scale))
        border = "border-bottom:2px solid #000;" if i == ctx["focus"] else ""
        spans.append(
            f'<span class="tok" style="background:rgba(214,39,40,{alpha:.2f});{border}" '
            f'title="{a:.3f}">{html.escape(t)}</span>'
        )
    return "".join(spans)


def _context_html(c: dict, scale: float) -> str:
    return f"<div class='ctx'>{_highlight(c, scale)} <small>({c['max']:.2f})</small></div>"


def card_tokens(card: dict) -> list[str]:
    """The tokens a card can be found by (lower-cased, stripped, sorted): the tokens its
    contexts highlight (where it fires) and the tokens its decoder promotes and suppresses."""
    found = set()
    for name in ("base", "rlhf"):
        contexts = list(card[f"contexts_{name}"])
        for band in card.get(f"quantiles_{name}") or []:
            contexts += band["contexts"]
        found |= {c["tokens"][c["focus"]] for c in contexts if c["tokens"]}
    found |= {t["token"] for k in ("promoted", "suppressed") for t in card[k]}
    return sorted({t.strip().lower() for t in found} - {""})


def _quantiles_html(card: dict, name: str, scale: float) -> str:
    bands = card.get(f"quantiles_{name}") or []
    return "".join(
        f"<div class='band'><small>{b['band']} of firings (activation {b['low']:.2f}&ndash;"
        f"{b['high']:.2f})</small>"
        + "".join(_context_html(c, scale) for c in b["contexts"])
        + "</div>"
        for b in bands
    )


def _density(card: dict, name: str) -> str:
    h = card["histogram"]
    return f"{1.0 - h[f'zero_fraction_{name}']:.2%}"


def render_card(card: dict, include_plotlyjs: bool | str = False, histogram: bool = True) -> str:
    """One feature card as an HTML fragment (contexts highlighted by activation, samples from
    each quantile band, activation density and histogram, promoted/suppressed tokens, IRM
    weight, matched partner). ``histogram=False`` leaves the plotly histogram out (a Jupyter
    widget's HTML runs no scripts: the explorer draws it as a figure widget beside the card)."""
    from irmlens.viz.figures import feature_histogram_figure

    scale = max([c["max"] for c in card["contexts_base"] + card["contexts_rlhf"]] or [0.0])
    ctx = {
        name: "".join(_context_html(c, scale) for c in card[f"contexts_{name}"])
        or "<div class='ctx'><i>never fires</i></div>"
        for name in ("base", "rlhf")
    }
    samples = {name: _quantiles_html(card, name, scale) for name in ("base", "rlhf")}
    tokens = {
        k: ", ".join(f"<code>{html.escape(t['token'])}</code>" for t in card[k])
        for k in ("promoted", "suppressed")
    }
    weight = "n/a" if card["irm_weight"] is None else f"{card['irm_weight']:+.4g}"

    def partner_text(model: str) -> str:
        p, c = card[f"{model}_partner"], card[f"{model}_cosine"]
        return (
            "none" if p is None or p < 0 or c is None else f"feature {p} (decoder cosine {c:.2f})"
        )

    partner = (
        f"{card['matching_tag']}: in the base SAE {partner_text('base')}; in the RLHF SAE "
        f"{partner_text('rlhf')}"
    )
    labels = (
        "; ".join(
            f"{html.escape(name)}: <b>{html.escape(str(lab['label']))}</b> ({html.escape(lab['explanation'])})"
            for name, lab in (card.get("labels") or {}).items()
        )
        or "n/a"
    )
    eff = card.get("ablation_effect")
    if eff is None:
        effect = "not measured (only the sparse IRM's features are ablated one at a time)"
    else:
        lo, hi = eff["ci"]
        effect = f"{eff['reward_change']:+.3f} [{lo:+.3f}, {hi:+.3f}]: " + (
            "no measurable effect alone (the CI spans 0; a feature can matter only with others)"
            if lo <= 0 <= hi
            else "ablating it alone lowers the reward"
            if hi < 0
            else "ablating it alone raises the reward"
        )
    hist = (
        feature_histogram_figure(card).to_html(
            full_html=False, include_plotlyjs=include_plotlyjs, config={"displaylogo": False}
        )
        if histogram
        else ""
    )
    ref = card_ref(card)
    null = card.get("divergence_null")
    divergence = (
        "n/a"
        if card.get("divergence") is None
        else f"{card['divergence']:.4f}" + ("" if null is None else f" (null pair {null:.4f})")
    )
    return f"""<details class="card" id="{feature_anchor(*ref)}" data-tokens="{html.escape(" ".join(card_tokens(card)))}"><summary><b>{html.escape(feature_label(*ref))}</b>
({html.escape(card["reason"].strip())}): divergence {divergence}, density
{_density(card, "base")} &rarr; {_density(card, "rlhf")} of tokens, IRM weight {weight}</summary>
<table class="kv"><tr><th>activation density (share of tokens it fires on)</th><td>base {_density(card, "base")}, RLHF {_density(card, "rlhf")}</td></tr>
<tr><th>reward-relevance labels</th><td>{labels}</td></tr>
<tr><th>reward change when ablated alone (RLHF model)</th><td>{effect}</td></tr>
<tr><th>matched partners</th><td>{html.escape(partner)}</td></tr>
<tr><th>promotes (logit lens)</th><td>{tokens["promoted"]}</td></tr>
<tr><th>suppresses</th><td>{tokens["suppressed"]}</td></tr></table>
<div class="ctxs"><div><h4>top contexts, base</h4>{ctx["base"]}</div><div><h4>top contexts, RLHF</h4>{ctx["rlhf"]}</div></div>
<details class="samples"><summary>samples from each quartile of its activations (what most firings look like)</summary>
<div class="ctxs"><div><h4>base</h4>{samples["base"] or "<i>never fires</i>"}</div><div><h4>RLHF</h4>{samples["rlhf"] or "<i>never fires</i>"}</div></div></details>
{hist}</details>"""

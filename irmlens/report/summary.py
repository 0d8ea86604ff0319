"""What a report concludes, written once for every view of it (HTML, Markdown, ``Study``): the
verdict rule and the list of main / reference / control rows."""

from __future__ import annotations


def verdict(irm: dict, controls: dict) -> str:
    """A finding only when the IRM beats every control its registry entry puts in the verdict
    (``irmlens.irm.controls.ControlSpec.verdict``): a permutation control by more than 2 of its
    standard deviations, the others with a paired CI of the difference that excludes 0."""
    from irmlens.irm.controls import CONTROLS

    failed = []
    for name, spec in CONTROLS.items():
        c = controls.get(name)
        if c is None or spec.verdict is None:
            continue
        if spec.verdict == "margin":
            margin = irm["heldout_kendall_tau"] - c["heldout_kendall_tau"]
            beaten = margin > 0 and margin > 2 * c.get("heldout_kendall_tau_std", 0.0)
        else:
            beaten = c["difference_ci"][0] > 0
        if not beaten:
            failed.append(name.replace("_", " "))
    if failed:
        return f"No finding yet: the IRM does not beat the {', '.join(failed)} control(s)."
    return "The IRM beats every control computed here (see the rows below)."


def controls_text(controls: dict) -> str:
    """The controls' taus and paired CIs in one line (the report's verdict table), registry
    order, those scored with a paired CI."""
    parts = []
    for name in controls_in_registry_order(controls):
        c = controls[name]
        if "difference_ci" not in c:
            continue
        lo, hi = c["difference_ci"]
        parts.append(
            f"{name.replace('_', ' ')}: {c['heldout_kendall_tau']:.3f} (difference CI [{lo:.3f}, "
            f"{hi:.3f}], {difference_reading(lo, hi)})"
        )
    return "; ".join(parts)


def difference_reading(lo: float, hi: float) -> str:
    """A paired CI of (IRM - control) in words: a CI below 0 says the IRM is significantly
    *worse* than the control, which "excludes 0" alone hides."""
    if lo > 0:
        return "excludes 0: the IRM scores higher"
    if hi < 0:
        return "excludes 0: the IRM scores lower than this control, significantly worse"
    return "includes 0: no difference"


def controls_in_registry_order(controls: dict) -> list[str]:
    """The names in ``controls``, registered ones in registry order, then any others (a run
    made with a control this process has not registered)."""
    from irmlens.irm.controls import CONTROLS

    return [n for n in CONTROLS if n in controls] + [n for n in controls if n not in CONTROLS]


def result_rows(report: dict) -> list[dict]:
    """The IRM's held-out tau beside its references and controls, one row each: ``name`` (the
    key in report.json), ``label`` (for people), ``kind`` (main / reference / control), ``tau``
    and, where known, ``ci``. The one list the HTML report, summary.md and ``Study`` show."""
    irm = report["irm"]
    rows = [
        {
            "name": "irm",
            "label": f"IRM ({irm['space']})",
            "tau": irm["heldout_kendall_tau"],
            "ci": irm["heldout_kendall_tau_ci"],
            "kind": "main",
        },
        {
            "name": "sparse_irm",
            "label": f"sparse IRM (k={irm['sparse']['k']})",
            "tau": irm["sparse"]["heldout_kendall_tau"],
            "ci": irm["sparse"]["heldout_kendall_tau_ci"],
            "kind": "main",
        },
    ]
    for name, r in irm["reference"].items():
        if r.get("is_the_target"):  # the target scored against itself (tau 1): no reference
            continue
        rows.append(
            {
                "name": name,
                "label": name.replace("_", " "),
                "tau": r["heldout_kendall_tau"],
                "ci": r.get("heldout_kendall_tau_ci"),
                "kind": "reference",
            }
        )
    rows.append(
        {
            "name": "paper_estimator",
            "label": "paper's estimator",
            "tau": report["paper_estimator"]["kendall_tau"],
            "kind": "reference",
        }
    )
    for name, c in report["controls"].items():
        rows.append(
            {
                "name": name,
                "label": name.replace("_", " "),
                "tau": c["heldout_kendall_tau"],
                "ci": c.get("difference_ci"),
                "kind": "control",
            }
        )
    return rows


def tau_bars(report: dict) -> list[dict]:
    """``result_rows`` as the figure's bars ({name, tau, ci?, kind}; controls without a CI bar:
    theirs is of a difference, not of their tau)."""
    bars = []
    for r in result_rows(report):
        bar = {"name": r["label"], "tau": r["tau"], "kind": r["kind"]}
        if r["kind"] != "control" and "ci" in r:
            bar["ci"] = r["ci"]
        bars.append(bar)
    return bars


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def validation_verdict(validation: dict | None, labels: dict | None) -> str:
    """What the causal validation and the labels found, in words; a finding only where a paired
    CI excludes 0."""
    if validation is None:
        return "Not validated (this run has no validate stage; rerun it with irmlens run)."
    arms = {a["arm"]: a for a in validation["arms"]}
    main = arms.get(f"ablate:{validation['main_arm']}")
    parts = (
        [validation["note"][0].upper() + validation["note"][1:] + "."]
        if "note" in validation
        else []
    )
    if main is not None:
        parts.append(
            f"Ablating the sparse IRM's {main['n_features']} features in the RLHF model removes "
            f"{_pct(main['share_of_gain'])} of its reward gain (reward {main['reward']:.3f} vs "
            f"{validation['reward_rlhf']:.3f}; base {validation['reward_base']:.3f})."
        )
    steer = arms.get(f"steer:{validation['main_arm']}@1")
    if steer is not None:
        parts.append(
            f"Steering the base model along their mean change reproduces "
            f"{_pct(steer['share_of_gain'])} of it."
        )
    found = [
        f["text"] + f" ({f['kind']}: {f['mean']:+.3f} [{f['ci'][0]:+.3f}, {f['ci'][1]:+.3f}])"
        for f in validation["findings"]
        if f["finding"]
    ]
    parts.append(
        "Findings (paired CI excludes 0): " + "; ".join(found) + "."
        if found
        else "No causal finding: no paired CI against a matched control excludes 0."
    )
    unmatched = [f["text"] for f in validation["findings"] if f["text"].endswith("not a finding")]
    if unmatched:
        parts.append("Differences with controls of another strength: " + "; ".join(unmatched) + ".")
    if labels is not None:
        c = labels["comparison"]
        lex = c["sparse_irm"]["lexicon"]
        rnd = c.get("random_sae_sparse", {}).get("lexicon")
        parts.append(
            f"The lexicon labeler calls {_pct(lex['share_related'])} of the sparse IRM's features "
            f"related to the reward (random dictionary's selection: "
            f"{_pct(rnd['share_related']) if rnd else 'n/a'}; all features: "
            f"{_pct(c['all']['lexicon']['share_related'])})."
        )
        if "llm" in c["sparse_irm"]:
            parts.append(llm_labeler_text(labels))
    return " ".join(parts)


def verification_text(report: dict) -> str | None:
    """One sentence for a report built from adopted (unverified) files; None otherwise."""
    v = report.get("verification") or {}
    adopted = [s for s in (v.get("adopted") or {}) if s not in ("models", "config")]
    if not adopted:
        return None
    unchecked = sum(int(a.get("unchecked", 0)) for a in v["adopted"].values())
    return (
        f"Built from unverified files: stages {', '.join(adopted)} were adopted by `irmlens adopt` "
        f"(no completion records), which recorded their files as it found them; {unchecked} of "
        "those files had nothing to check them against, so an edit made before adoption would "
        "not show. Redo the run to have every figure verified."
    )


DIVERGENCE_NOTE = (
    "divergence: the RMS norm of the change a feature writes between the two models, as a "
    "fraction of the activations' RMS norm; ranked by the RLHF pair's divergence minus the null "
    "pair's (a feature that changes as much under the null fine-tuning is drift, not reward)."
)


def divergence_sentence(fd: dict) -> str:
    """How many features moved, in the RLHF pair and the null pair, said so that a count the
    null pair matches reads as drift."""
    head = (
        f"{fd['n_divergent']} of {fd['n_features']} shared-SAE features (layer {fd['layer']}) "
        f"have divergence > {fd['threshold']}"
    )
    if fd.get("n_divergent_null") is None:
        return head + " (no null model: drift cannot be told apart)"
    beyond = fd.get("n_divergent_beyond_null")
    out = head + f"; the null pair: {fd['n_divergent_null']}"
    if beyond is not None:
        out += f"; {beyond} beyond the null pair's by more than {fd['threshold']}"
    if fd["n_divergent_null"] >= fd["n_divergent"]:
        out += " (the null fine-tuning moves as many: the count alone is drift, not reward)"
    return out


def target_terms(report: dict) -> dict[str, str]:
    """What the IRM is scored against, in the words every heading, axis and sentence uses: the
    reward model's utilities, or (``data.lexicon = "none"``) the pair's own implicit reward, so
    that an RM-free report never speaks of a reward model it was not given."""
    if (report.get("reward_model") or {}).get("true_reward_model", True):
        return {
            "question": "What did RLHF teach the model, and how far is that implicit reward "
            "model (IRM) from the reward model it was trained on?",
            "versus": "Implicit reward model vs the reward model",
            "target": "true utility",
            "axis": "true utility (lexicon)",
        }
    return {
        "question": "What did the tuning teach the model? No reward model was given: the "
        "implicit reward model (IRM) explains the pair's own implicit reward (β log π_tuned / "
        "π_base per word) through features.",
        "versus": "Implicit reward model vs the pair's implicit reward (the target)",
        "target": "target (the pair's implicit reward)",
        "axis": "the pair's implicit reward per word (the target)",
    }


def llm_labeler_passed(labels: dict | None) -> bool:
    """Whether the LLM labeler answered all three of its known-answer features right (a
    labeler that misses them says nothing trustworthy about real features)."""
    check = ((labels or {}).get("llm") or {}).get("check") or {}
    return check.get("correct") == len(check.get("expected_vs_answer") or {}) == 3


def llm_labeler_text(labels: dict) -> str:
    """The LLM labeler's line of the verdict: its figures when it passed its known-answer check;
    otherwise that it failed it and its labels are left out of the verdict."""
    c = labels["comparison"]["sparse_irm"]
    check = (labels.get("llm") or {}).get("check") or {}
    backend = labels["llm"]["backend"]
    if not llm_labeler_passed(labels):
        return (
            f"The LLM labeler ({backend}) got {check.get('correct', 'n/a')} of its 3 known-answer "
            f"features right, so its labels ({_pct(c['llm']['share_related'])} of the sparse "
            "IRM's features called related) are left out of this verdict; the cards still show "
            "them, marked unchecked."
        )
    kappa = c.get("kappa_llm_lexicon")
    return (
        f"The LLM labeler ({backend}, 3 of 3 known-answer features right): "
        f"{_pct(c['llm']['share_related'])} related, Cohen's kappa with the lexicon labeler "
        f"{'n/a' if kappa is None else f'{kappa:+.2f}'}."
    )


def glance(report: dict) -> list[tuple[str, str]]:
    """The study in four or five short sentences for the page's first screen: what the tuning
    changed (reward and KL), where (the mediation stage's layer shares), which features (the
    sparse IRM's first three and the top divergent beyond the null pair, by (dictionary,
    layer, index)), and whether anything is a finding (the IRM's verdict and the validation's)."""
    from irmlens.refs import feature_label

    out = []
    r = report.get("rlhf")
    if r:
        out.append(
            (
                "What changed",
                f"{r['algorithm']} raised the mean reward {r['reward_before']:.3f} → "
                f"{r['reward_after']:.3f} at KL {r['kl']:.2f} nats per completion.",
            )
        )
    med = report.get("mediation")
    if med and med.get("studied"):
        st = med["studied"]
        shares = ", ".join(f"layer {la} {v:.0%}" for la, v in st["layers"].items())
        final = (med.get("sweep") or {}).get("final_norm_and_unembedding")
        where = f"share of the gain each studied layer's output carries: {shares}"
        if final is not None:
            where += f"; the final norm and unembedding hold {final:.0%}"
        if st.get("warning"):
            where += f". {st['warning']}"
        out.append(("Where", where + "."))
    irm = report["irm"]
    top = [
        feature_label(f["dictionary"], f["layer"], f["local_feature"])
        for f in irm["top_features"][:3]
        if "dictionary" in f
    ]
    if top:
        out.append(
            (
                "Which features",
                f"the sparse IRM ({irm['sparse']['k']} features, held-out τ "
                f"{irm['sparse']['heldout_kendall_tau']:.3f}) chose first {', '.join(top)}.",
            )
        )
    div = report.get("divergent_features") or []
    if div:
        fd = report["feature_divergence"]
        moved = ", ".join(feature_label("shared", fd["layer"], f["feature"]) for f in div[:3])
        out.append(("Moved most beyond drift", f"{moved}; {divergence_sentence(fd)}."))
    controls = report.get("controls") or {}
    causal = [
        part.rstrip(".") + "."
        for part in validation_verdict(report.get("validation"), report.get("labels")).split(". ")
        if part.startswith(("Findings", "No causal finding", "Not validated"))
    ]
    out.append(
        (
            "Finding?",
            f"IRM held-out τ {irm['heldout_kendall_tau']:.3f}. {verdict(irm, controls)} "
            + " ".join(causal[:1]),
        )
    )
    return out

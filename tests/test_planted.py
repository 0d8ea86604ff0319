"""Planted truth: a model pair whose difference we wrote ourselves, through the whole pipeline.

The "after" model is the "before" model with a known direction v added to the input embedding of
60 known words, scaled by each word's known utility: the residual stream at every layer carries
``u(w) * v`` wherever such a word appears. The reward model is a lexicon of exactly those
utilities. The pipeline must find v (its top divergent feature and top IRM feature point along v),
recover the utilities of held-out planted words (Spearman >= 0.8), and find no divergent feature
in a null pair (the same model with tiny weight noise).
"""

from __future__ import annotations

import torch

from irmlens.io import read_json


def _cos_with(direction: torch.Tensor, sae) -> torch.Tensor:
    """|cosine| with v of each feature's encoder direction (what its activation reads) or decoder
    direction (what it writes), whichever is larger."""
    enc = torch.nn.functional.normalize(sae.W_enc.detach().float().T, dim=1) @ direction
    dec = torch.nn.functional.normalize(sae.W_dec.detach().float(), dim=1) @ direction
    return torch.maximum(enc.abs(), dec.abs())


def test_pipeline_recovers_planted_utilities_and_features(planted, planted_run):
    from irmlens.study import Study

    _, _, utilities, direction = planted
    study = Study.load(planted_run)
    irm = study.report["irm"]
    # utilities of held-out planted words recovered
    assert irm["heldout_spearman"] >= 0.8, irm["heldout_spearman"]
    held = {p["word"]: p["irm"] for p in irm["heldout_points"]}
    assert len(held) >= 10 and set(held) <= set(utilities)
    # the dictionary found v, and the pipeline ranks the planted feature first
    cos = _cos_with(direction, study.sae())
    top_div = study.report["divergent_features"][0]["feature"]
    assert cos[top_div] >= 0.5, float(cos[top_div])
    first = irm["top_features"][0]  # the sparse IRM's first pick, named in its own dictionary
    assert first["dictionary"] != "sae_error", first
    model = "shared" if first["dictionary"] == "shared" else first["dictionary"]
    cos_first = _cos_with(direction, study.sae(model=model, layer=first["layer"]))
    assert cos_first[first["local_feature"]] >= 0.5, (
        first,
        float(cos_first[first["local_feature"]]),
    )
    # the planted change is the only change: the null pair has no divergent feature
    fd = study.report["feature_divergence"]
    assert fd["n_divergent"] >= 1
    assert fd["n_divergent_null"] == 0
    assert fd["n_divergent_beyond_null"] == fd["n_divergent"]
    # the null pair's divergence sits beside every listed feature's: far below the planted one's
    top = study.report["divergent_features"][0]
    assert top["divergence_null"] < 0.1 * top["divergence"], top
    # the null pair's IRM knows nothing of the utilities; the IRM beats it
    assert study.report["controls"]["null_pair"]["difference_ci"][0] > 0


def test_study_tables_are_consistent(planted_run):
    from irmlens.study import Study

    study = Study.load(planted_run)
    features = study.features
    n_layers = len(study.report["studied_layers"])
    assert len(features) == n_layers * study.report["feature_divergence"]["n_features"]
    assert features["divergence_beyond_null"].is_monotonic_decreasing
    assert {"divergence_null", "relative_change"} <= set(features)
    words = study.words
    assert set(words["split"]) == {"fit", "heldout"}
    assert (words["split"] == "heldout").sum() == study.report["irm"]["n_heldout_words"]
    controls = study.controls
    assert {"shuffled_targets", "random_sae", "base_only", "null_pair"} <= set(controls["name"])
    # flat columns: tau once, CIs as two numbers saying what they bound, the IRM's own Spearman
    assert list(controls.columns).count("heldout_kendall_tau") == 1 and "tau" not in controls
    assert controls[["ci_low", "ci_high"]].map(lambda v: not isinstance(v, list)).all().all()
    irm_row = controls.set_index("name").loc["irm"]
    assert irm_row["heldout_spearman"] == study.report["irm"]["heldout_spearman"]
    assert irm_row["ci_of"] == "tau"
    assert controls.set_index("name").loc["random_sae", "ci_of"] == "difference"
    assert len(study.spaces) >= 5
    report = read_json(planted_run / "report" / "report.json")
    assert report["rlhf"] is None and report["models"]["null"]["path"]


def test_the_lexicon_labeler_labels_the_planted_feature_by_its_polarity(planted, planted_run):
    """Issue 14: the planted feature (the top divergent one, reading along v) fires on the planted
    words in the "after" model, with the sign of their utility; a feature that fires on no word
    is unrelated."""
    from irmlens.cache.store import hook_name, load_activations, load_token_rows
    from irmlens.labels import evidence_from_activations
    from irmlens.labels.lexicon import LexiconLabeler
    from irmlens.rewards.lexicon import LexiconRewardModel
    from irmlens.study import Study
    from sae_training.train import encode_batched

    _, lexicon, _, direction = planted
    study = Study.load(planted_run)
    sae, layer = study.sae(), study.report["irm"]["layer"]
    rows = load_token_rows(planted_run / "cache")
    acts = load_activations(planted_run / "cache", "rlhf", hook_name(layer))
    word_id = rows.word_id[rows.valid]
    codes = encode_batched(sae, acts.float())
    top = study.report["divergent_features"][0]["feature"]
    reads = float(
        torch.nn.functional.normalize(sae.W_enc[:, top].detach().float(), dim=0) @ direction
    )
    labeler = LexiconLabeler(LexiconRewardModel.from_file(lexicon).word_utility)
    ev = evidence_from_activations(top, codes[:, top], word_id, rows.words)
    label = labeler.label([ev])[0]
    assert label.label == ("positive" if reads > 0 else "negative"), (reads, label)
    assert label.scores["lexicon_mass"] > 0.5
    # the same feature's activations moved to positions where no word ends: unrelated
    off_words = torch.where(word_id < 0, codes[:, top].abs() + 1.0, torch.zeros(len(word_id)))
    assert labeler.label([evidence_from_activations(1, off_words, word_id, rows.words)])[
        0
    ].label == ("unrelated")


def test_ablating_the_planted_features_removes_the_planted_shift(planted, planted_run):
    """Issue 14: the validate stage's ablation edit, applied to the "after" model's activations
    at the IRM layer, takes out most of the planted shift ``u(w) v`` at planted words (after -
    base, along v). The dictionary splits v over several features (one sign each, and groups of
    words: 10 with decoder |cos| >= 0.8 on this pair; the top one alone carries about a tenth of
    the shift), so the planted features are those that write along v; as many features that do
    not read v leave the shift whole."""
    from irmlens.cache.store import hook_name, load_activations, load_token_rows
    from irmlens.study import Study
    from irmlens.validate.interventions import ablation

    _, _, utilities, direction = planted
    study = Study.load(planted_run)
    sae, layer = study.sae(), study.report["irm"]["layer"]
    rows = load_token_rows(planted_run / "cache")
    word_id = rows.word_id[rows.valid]
    planted_ids = [i for i, w in enumerate(rows.words) if w in utilities]
    at = torch.isin(word_id, torch.tensor(planted_ids))
    base = load_activations(planted_run / "cache", "base", hook_name(layer))[at].float()
    after = load_activations(planted_run / "cache", "rlhf", hook_name(layer))[at].float()
    writes = torch.nn.functional.normalize(sae.W_dec.detach().float(), dim=1) @ direction
    planted_features = torch.nonzero(writes.abs() >= 0.8).squeeze(-1).tolist()
    off_v = torch.argsort(_cos_with(direction, sae))[: len(planted_features)].tolist()
    assert study.report["divergent_features"][0]["feature"] in planted_features

    def shift_left(features: list[int]) -> float:
        edited = ablation(sae, features)(after) if features else after
        return float(((edited - base) @ direction).abs().mean())

    shift = shift_left([])
    assert at.sum() > 20 and shift > 0.5 and len(planted_features) >= 2, (int(at.sum()), shift)
    assert shift_left(planted_features) < 0.4 * shift, (shift_left(planted_features), shift)
    assert shift_left(off_v) > 0.95 * shift, (shift_left(off_v), shift)


def test_the_validate_and_labels_stages_report_every_arm(planted_run):
    """Every arm of the validate stage is in report.json with a finite reward, CI and KL; the
    labels stage labelled every feature of the IRM's dictionary."""
    from irmlens.study import Study

    study = Study.load(planted_run)
    v = study.report["validation"]
    arms = study.validation
    sets = set(v["feature_sets"])
    assert {"sparse_irm", "matched_random_0", "matched_random_1", "random_sae_sparse"} <= sets
    assert {"top_divergent", "reward_logit"} <= sets
    assert {f"ablate:{s}" for s in sets} <= set(arms["arm"])
    assert "steer:sparse_irm@1" in set(arms["arm"])
    assert (arms["reward_ci_low"] <= arms["reward"]).all()
    assert (arms["reward"] <= arms["reward_ci_high"]).all()
    main = arms[arms["arm"] == "ablate:sparse_irm"].iloc[0]
    assert main["kl_to_unintervened"] >= -0.5 and main["perplexity"] > 1
    assert len(v["single_feature_ablation"]) == main["n_features"]
    labels = study.report["labels"]["comparison"]
    # every feature of the IRM's dictionary at every layer it reads
    n_layers = len(study.report["irm"]["layers"])
    assert labels["all"]["lexicon"]["n"] == n_layers * study.sae().cfg.d_sae
    assert labels["sparse_irm"]["lexicon"]["n"] == main["n_features"]
    assert not study.labels.empty


def test_ablating_every_feature_of_a_trained_sae_leaves_its_error(planted_run):
    """Issue 14: with a trained dictionary (the planted run's shared SAE, which normalises its
    input), ablating every feature leaves the activation minus the SAE's reconstruction plus
    decode(0), checked against the SAE's own encode/decode to 1e-5."""
    from irmlens.cache.store import hook_name, load_activations
    from irmlens.study import Study
    from irmlens.validate.interventions import ablation

    study = Study.load(planted_run)
    sae, layer = study.sae(), study.report["irm"]["layer"]
    acts = load_activations(planted_run / "cache", "rlhf", hook_name(layer))[:2048].float()
    with torch.no_grad():
        error_model = (
            acts - sae.decode(sae.encode(acts)) + sae.decode(torch.zeros(1, sae.cfg.d_sae))
        )
        edited = ablation(sae, range(sae.cfg.d_sae))(acts)
    assert torch.allclose(edited, error_model, atol=1e-5), float((edited - error_model).abs().max())
    assert float((edited - acts).norm()) > 0.1 * float(acts.norm())  # it did remove something

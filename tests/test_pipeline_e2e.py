"""End-to-end: `irmlens run` on the micro config (well under 2 minutes on 2 cores)."""

import json
import math
import re
from pathlib import Path

import pytest

from irmlens.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_report_json_has_schema_v3_fields(micro_run):
    r = json.loads((micro_run / "report/report.json").read_text())
    assert r["schema_version"] == 4
    for m in ("base", "rlhf", "null"):
        assert (
            r["models"][m]["n_layers"] == 2
            and r["models"][m]["d_model"] == 64
            and r["models"][m]["name"]
        )
    assert r["rlhf"]["algorithm"] == "ppo" and r["rlhf"]["steps"] == 16
    assert set(r["rlhf"]["hacking_signals"]) >= {"repetition_rate_after", "lexicon_fraction_after"}
    for k in ("reward_before", "reward_after", "kl"):
        assert _finite(r["rlhf"][k])
    assert [d["layer"] for d in r["layers"]] == [0, 1]
    assert all(
        _finite(d["divergence"]) and d["divergence"] > 0 and _finite(d["relative_divergence"])
        for d in r["layers"]
    )
    assert len(r["studied_layers"]) == 1
    assert {s["model"] for s in r["saes"]} == {
        "base",
        "rlhf",
        "shared",
        "shared-topk64",
        "difference",
    }
    for s in r["saes"]:
        assert all(
            _finite(s[k]) for k in ("width", "explained_variance", "l0", "dead_fraction", "mse")
        )
    irm = r["irm"]
    for k in (
        "layer",
        "n_fit_words",
        "n_heldout_words",
        "heldout_kendall_tau",
        "heldout_spearman",
        "cv_r2",
    ):
        assert _finite(irm[k]), k
    assert irm["n_fit_words"] > 100 and irm["n_heldout_words"] > 30
    lo, hi = irm["heldout_kendall_tau_ci"]
    assert lo <= irm["heldout_kendall_tau"] <= hi
    assert _finite(irm["reference"]["raw_difference"]["heldout_kendall_tau"])
    for name in ("random_sae", "base_only", "null_pair", "random_sae_sparse"):
        c = r["controls"][name]
        assert _finite(c["heldout_kendall_tau"]) and c["difference_ci"][0] <= c["difference_ci"][1]
    ctrl = r["controls"]["shuffled_targets"]
    assert _finite(ctrl["heldout_kendall_tau"]) and _finite(ctrl["heldout_spearman"])
    lo, hi = irm["heldout_spearman_ci"]
    assert lo <= irm["heldout_spearman"] <= hi
    names = {sp["name"] for sp in irm["spaces"]}
    assert {"sae_codes", "sae_pre", "sae_codes_error", "raw_difference"} <= names
    assert irm["space"] in names and irm["space"] != "raw_difference"
    assert irm["sparse"]["k"] <= 32 and len(irm["sparse"]["features"]) == irm["sparse"]["k"]
    assert _finite(irm["sparse"]["heldout_kendall_tau"])
    assert _finite(irm["reference"]["model_implicit_reward"]["heldout_kendall_tau"])
    assert _finite(r["paper_estimator"]["kendall_tau"]) and r["paper_estimator"]["n_examples"] > 100
    fm = r["feature_matching"]
    assert sum(fm["cosine_histogram"]) == fm["width"]
    q = fm["cosine_quantiles"]
    assert -1 <= q["p10"] <= q["p50"] <= q["p90"] <= 1
    matching = json.loads((micro_run / f"diff/matching_layer{fm['layer']}.json").read_text())
    partners = [p for p in matching["partner"] if p >= 0]
    assert len(partners) == len(set(partners)) == fm["width"]  # one-to-one
    assert len(r["divergent_features"]) == 50
    # ranked by the change beyond the null pair's, with both pairs' divergence beside it
    keys = [f["divergence_beyond_null"] for f in r["divergent_features"]]
    assert keys == sorted(keys, reverse=True)
    for f in r["divergent_features"]:
        assert f["divergence_beyond_null"] == pytest.approx(f["divergence"] - f["divergence_null"])
    assert len(r["divergent_words"]) == 20
    every = json.loads((micro_run / "irm/word_attribution.json").read_text())
    assert len(every) == irm["n_heldout_words"]
    assert r["divergent_words"][0]["divergence"] == max(w["divergence"] for w in every)
    # 10 most over-valued (most first), then 10 most under-valued (most first)
    assert r["divergent_words"][10]["divergence"] == min(w["divergence"] for w in every)
    assert len({w["word"] for w in r["divergent_words"]}) == 20


def test_rlhf_raised_reward_and_saes_reconstruct(micro_run):
    r = json.loads((micro_run / "report/report.json").read_text())
    assert r["rlhf"]["reward_after"] > r["rlhf"]["reward_before"] + 0.1
    assert r["rlhf"]["kl"] > 0
    # better than reconstructing with zero / the mean: explained variance well above 0
    assert all(s["explained_variance"] > 0.5 for s in r["saes"])
    metrics = [
        json.loads(line) for line in (micro_run / "rlhf/metrics.jsonl").read_text().splitlines()
    ]
    assert all("reward_mean" in m and "kl" in m for m in metrics) and len(metrics) == 16


def test_crosscoder_is_trained_diffed_and_compared_beside_the_saes(micro_run):
    """The study's crosscoder over base, RLHF and null model: its evals, the RLHF pair's and the
    null pair's decoder-norm tags, its IRM spaces beside the SAEs' (report.json
    ``feature_spaces``), the activation difference lens as a reference, and both figures."""
    r = json.loads((micro_run / "report/report.json").read_text())
    cc = r["crosscoder"]
    assert cc["models"] == ["base", "rlhf", "null"] and cc["architecture"] == "batchtopk"
    assert cc["width"] == 128 and cc["layer"] == r["irm"]["layer"]
    for m in cc["models"]:
        e = cc["evals"]["per_model"][m]
        assert e["explained_variance"] > 0.5 and _finite(e["ce_loss_recovered"]), (m, e)
    assert abs(cc["evals"]["l0"] - 32) < 8  # the calibrated threshold keeps k latents a token
    for pair in ("rlhf", "null"):
        p = cc["pairs"][pair]
        assert sum(p["tag_counts"].values()) == cc["width"] == sum(p["relative_norm_histogram"])
        assert len(p["tuned_only"]) == p["tag_counts"]["tuned_only"]
        assert all(0.9 <= t["relative_norm"] <= 1 for t in p["tuned_only"])
    kinds = {row["space"]: row for row in r["feature_spaces"]}
    assert kinds["crosscoder_codes"]["dictionary"] == "crosscoder"
    assert kinds["sae_codes"]["dictionary"] == "shared SAE"
    assert kinds["base_sae_codes"]["dictionary"].startswith("paired SAE")
    assert all(_finite(row["heldout_kendall_tau"]) for row in r["feature_spaces"])
    main = [row for row in r["feature_spaces"] if row["main"]]
    assert len(main) == 1 and "random_sae" in main[0]["controls"] and main[0]["validation_arms"]
    # the sparse crosscoder IRM's latents, ablated (lockstep) and steered beside matched draws
    ccrow = kinds["crosscoder_codes"]
    assert ccrow["sparse"]["k"] == len(ccrow["sparse"]["features"]) > 0
    v = r["validation"]["crosscoder"]
    assert v["latents"] == ccrow["sparse"]["features"] and v["models"] == cc["models"]
    arms = {a["arm"]: a for a in v["arms"]}
    assert {"ablate:crosscoder_sparse", "steer:crosscoder_sparse@1"} <= set(arms)
    assert sum(a.startswith("ablate:crosscoder_matched_random_") for a in arms) == 2
    assert all(_finite(a["reward"]) and a["kl_to_unintervened"] >= -0.05 for a in arms.values())
    ablated = arms["ablate:crosscoder_sparse"]
    assert ablated["kl_to_unintervened"] > 0  # the lockstep ablation changes the RLHF model
    assert 0 < ablated["removed_variance_share"] < 1
    assert {f["control"] for f in v["findings"]} == {
        "crosscoder_matched_random_mean",
        "the sparse IRM's SAE features",
    }
    assert ccrow["validation_arms"] and ccrow["validation_findings"] == v["findings"]
    # and labelled like SAE features, beside as many random live latents
    comp = r["labels"]["comparison"]
    assert comp["crosscoder_sparse"]["lexicon"]["n"] == len(v["latents"])
    assert comp["crosscoder_random"]["lexicon"]["n"] == len(v["latents"])
    labelled = r["labels"]["sets"]["crosscoder_sparse"]["lexicon"]
    assert [x["feature"] for x in labelled] == v["latents"]
    steered = r["validation"]["activation_difference_lens"]  # the lens's own steering arm
    assert [a["scale"] for a in steered["arms"]] == [1.0] and steered["vector_norm"] > 0
    assert _finite(steered["arms"][0]["reward"]) and len(steered["findings"]) == 2
    lens = r["irm"]["reference"]["activation_difference_lens"]
    assert _finite(lens["heldout_kendall_tau"]) and lens["n_heldout_words"] > 20
    assert len(lens["top_tokens"]) == 10 and lens["difference_ci"][0] <= lens["difference_ci"][1]
    html = (micro_run / "report/index.html").read_text()
    assert "Crosscoder: decoder norms" in html and "Crosscoder: latent scaling" in html
    assert "activation difference lens" in html and "Crosscoder latents" in html
    assert "Activation difference lens: steering" in html


def test_saes_load_with_saelens(micro_run):
    from sae_lens import SAE

    cfgs = [c for c in (micro_run / "saes").rglob("cfg.json") if "crosscoder" not in c.parts]
    assert len(cfgs) == 8  # base, rlhf, shared at 2 widths, the wide TopK, the difference SAE
    for c in cfgs:
        sae = SAE.load_from_disk(str(c.parent))
        assert sae.cfg.d_in == 64


def test_html_is_self_contained(micro_run):
    html = (micro_run / "report/index.html").read_text()
    assert "Plotly" in html and html.count('class="plotly-graph-div"') >= 5
    assert not re.search(r"<script[^>]+src=", html)
    assert not re.search(r"<link[^>]+href=\"https?:", html)


def test_rerun_skips_finished_stages(micro_run, capsys):
    before = (micro_run / "irm/metrics.json").read_text()
    assert main(["run", str(ROOT / "tests/micro.toml"), "--out", str(micro_run)]) == 0
    out = capsys.readouterr().out
    assert "rlhf: done, skipping" in out and "null: done, skipping" in out
    assert "cache: done, skipping" in out
    assert (micro_run / "irm/metrics.json").read_text() == before


def test_changed_config_on_existing_run_is_refused(micro_run, tmp_path, capsys):
    cfg = (ROOT / "tests/micro.toml").read_text().replace("steps = 16", "steps = 17")
    p = tmp_path / "micro.toml"
    p.write_text(cfg)
    assert main(["run", str(p), "--out", str(micro_run)]) == 2
    assert "different config" in capsys.readouterr().err


def test_verdict_requires_beating_every_control():
    from irmlens.report.summary import verdict as _verdict

    shuffled = {"heldout_kendall_tau": 0.0, "heldout_kendall_tau_std": 0.02}
    irm = {"heldout_kendall_tau": 0.3}
    strong = {
        "shuffled_targets": shuffled,
        "random_sae": {"difference_ci": [0.05, 0.2]},
        "base_only": {"difference_ci": [0.1, 0.3]},
    }
    assert _verdict(irm, strong).startswith("The IRM beats every control")
    weak = dict(strong, random_sae={"difference_ci": [-0.03, 0.05]})
    assert _verdict(irm, weak) == "No finding yet: the IRM does not beat the random sae control(s)."
    assert "shuffled targets" in _verdict({"heldout_kendall_tau": 0.03}, strong)


def test_diff_and_irm_commands_on_a_finished_run(micro_run, capsys, tmp_path):
    before = (micro_run / "irm/metrics.json").read_text()
    assert main(["irm", str(micro_run)]) == 0  # outputs present: reported, not recomputed
    out = capsys.readouterr().out
    assert "held-out Kendall tau" in out and "control null_pair" in out
    assert (micro_run / "irm/metrics.json").read_text() == before
    assert main(["diff", str(micro_run)]) == 0
    assert "paired dictionaries" in capsys.readouterr().out
    assert main(["irm", str(tmp_path)]) == 2
    assert "not an irmlens run folder" in capsys.readouterr().err


def _irm_files(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / "irm").iterdir())}


def test_interrupted_irm_force_leaves_the_previous_results_usable(micro_run, tmp_path, monkeypatch):
    """Issue 18, defect 4: `irm --force` deleted the results first, so an interruption left a run
    that `irmlens report` refused. Killed while the new files are being written (a kill earlier
    in the computation writes nothing at all: a weaker case). The cards and report (derived from
    the IRM) are invalidated up front."""
    import shutil

    import irmlens.stages.irm

    run = tmp_path / "copy"
    shutil.copytree(micro_run, run)
    before = _irm_files(run)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    for module, name in ((irmlens.stages.irm, "atomic_write_json"),):  # in the temporary irm/
        with monkeypatch.context() as m:
            m.setattr(module, name, killed)
            with pytest.raises(KeyboardInterrupt):
                main(["irm", str(run), "--force"])
        assert _irm_files(run) == before, name  # the old IRM, whole
        assert not [p for p in run.iterdir() if p.name.startswith(".irm.")]  # no temp folder
        assert not (run / "diff/cards.json").exists() and not (run / "report").exists()
        assert main(["report", str(run)]) == 0  # rebuilds the cards, then the report
        assert (run / "report/report.json").exists()


def test_irm_force_replaces_the_results_and_invalidates_cards_and_report(
    micro_run, tmp_path, capsys, monkeypatch
):
    """Also: a feature space is one registry entry (docs/extending.md's example, as a reference
    so that the main IRM's choice stays the same)."""
    import shutil

    from irmlens.irm.spaces import SPACES, SpaceSpec

    run = tmp_path / "copy"
    shutil.copytree(micro_run, run)
    metrics = json.loads((run / "irm/metrics.json").read_text())
    stamp = (run / "irm/metrics.json").stat().st_mtime_ns
    extra = SpaceSpec("base_sae_pre", "pre", "base", False, False, lambda i: "base-only pre")
    monkeypatch.setitem(SPACES, extra.name, extra)
    assert main(["irm", str(run), "--force"]) == 0
    spaces = {r["name"] for r in json.loads((run / "irm/metrics.json").read_text())["spaces"]}
    assert spaces == {r["name"] for r in metrics["spaces"]} | {"base_sae_pre"}
    assert "the report was removed" in capsys.readouterr().out
    assert (run / "irm/metrics.json").stat().st_mtime_ns != stamp  # recomputed ...
    new = json.loads((run / "irm/metrics.json").read_text())
    assert new["heldout_kendall_tau"] == metrics["heldout_kendall_tau"]  # ... deterministically
    assert not (run / "diff/cards.json").exists() and not (run / "report").exists()
    assert main(["report", str(run)]) == 0
    assert (
        json.loads((run / "report/report.json").read_text())["irm"]["heldout_kendall_tau"]
        == (new["heldout_kendall_tau"])
    )


def test_a_stage_is_one_module_and_one_line(micro_run, tmp_path, monkeypatch):
    """docs/extending.md's example stage, added to STAGES: it runs on resume, and is invalidated
    (then rebuilt) when a stage it needs is forced."""
    import shutil
    import types

    import irmlens.pipeline
    from irmlens.config import load_config
    from irmlens.io import atomic_write_json, read_json
    from irmlens.pipeline import STAGES, Stage, run_study

    def run_top_words(ctx):
        points = read_json(ctx.paths.irm_metrics)["heldout_points"]
        atomic_write_json(
            ctx.paths.root / "irm_top_words.json", sorted(points, key=lambda p: -p["irm"])[:20]
        )

    top_words = types.SimpleNamespace(
        run=run_top_words, outputs=lambda paths: [paths.root / "irm_top_words.json"]
    )
    stages = list(STAGES)
    stages.insert(-1, Stage("top_words", top_words.run, top_words.outputs, ("irm",)))
    monkeypatch.setattr(irmlens.pipeline, "STAGES", tuple(stages))
    run = tmp_path / "copy"
    shutil.copytree(micro_run, run)
    cfg = load_config(run / "config.toml")
    run_study(cfg, run, stop_after="top_words")
    out = run / "irm_top_words.json"
    assert len(read_json(out)) == 20
    assert [s.name for s in irmlens.pipeline.dependents("irm")] == [
        "mediate",
        "validate",
        "labels",
        "cards",
        "top_words",
        "report",
    ]
    irmlens.pipeline.invalidate(irmlens.pipeline.RunPaths(run), "irm")
    assert not out.exists() and not (run / "report").exists()


# ------------------------------------------------------------------ damaged files (issue 13)


def _copy_run(micro_run: Path, tmp_path: Path) -> Path:
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(micro_run, run)
    return run


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:  # flip one byte in the middle: same size, other content
        i = len(data) // 2
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :])


DAMAGED = [
    ("irm/metrics.json", "truncate"),
    ("irm/metrics.json", "flip"),
    ("diff/cards.json", "flip"),
    ("models/dirs.json", "truncate"),
    ("irm/coefficients.safetensors", "flip"),
    ("diff/features_layer*.csv", "flip"),
    ("irm/word_utilities.csv", "truncate"),
    ("config.toml", "flip"),
]


@pytest.mark.parametrize("pattern, how", DAMAGED, ids=[f"{p}-{h}" for p, h in DAMAGED])
def test_a_damaged_file_is_named_with_the_fix_by_every_reader(
    micro_run, tmp_path, capsys, pattern, how
):
    """These made `irmlens report` die with JSONDecodeError / UnicodeDecodeError /
    SafetensorError / TypeError, or were used as they were."""
    from irmlens.errors import DamagedFileError
    from irmlens.study import Study

    run = _copy_run(micro_run, tmp_path)
    target = next(run.glob(pattern))
    _damage(target, how)
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert str(target) in err and "irmlens run" in err, err
    assert "Traceback" not in err
    with pytest.raises(DamagedFileError, match=re.escape(str(target))):
        Study.load(run)


def test_irmlens_run_redoes_a_damaged_stage_and_the_stages_after_it(micro_run, tmp_path, capsys):
    run = _copy_run(micro_run, tmp_path)
    good = (run / "diff/cards.json").read_bytes()
    _damage(run / "diff/cards.json", "flip")
    # the command the error message gives: the run's own config.toml
    assert main(["run", str(run / "config.toml"), "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "cards: damaged" in out and "irm: done, skipping" in out
    assert (run / "diff/cards.json").read_bytes() == good  # redone, to the same bytes
    from irmlens.study import Study

    Study.load(run)  # verified again


def test_validate_says_so_when_the_sparse_irm_has_no_dictionary_feature(micro_run, tmp_path):
    """A sparse IRM of SAE-error columns only (possible in the codes+error space) leaves nothing
    to ablate or steer: the stage measures the baselines and says why, and the report renders."""
    import shutil

    from irmlens.config import load_config
    from irmlens.io import atomic_write_json, read_json
    from irmlens.run import RunPaths
    from irmlens.stages import validate
    from irmlens.stages.context import StudyContext

    run = tmp_path / "copy"
    shutil.copytree(micro_run, run)
    metrics = read_json(run / "irm/metrics.json")
    for ref in metrics["sparse"]["feature_refs"]:
        ref["dictionary"] = "sae_error"
    atomic_write_json(run / "irm/metrics.json", metrics)
    validate.run(StudyContext(load_config(run / "config.toml"), RunPaths(run)))
    v = read_json(run / "validate/validation.json")
    assert [a["arm"] for a in v["arms"]] == ["base", "rlhf"] and v["paper"] is None
    assert "SAE-error" in v["note"] and v["findings"] == []
    assert v["reward_rlhf"] > v["reward_base"]
    from irmlens.report.build import validation_html
    from irmlens.report.summary import validation_verdict

    assert "nothing to ablate" in validation_html(v, None)
    assert validation_verdict(v, None).startswith("The sparse IRM chose only SAE-error columns")


def test_report_and_log_carry_the_per_stage_timing_table(micro_run):
    """report.json ``timings``: every recorded stage before the report (in the order their last
    runs finished; other tests here redo some stages), with the seconds of its last completed
    run and the machine it ran on; the same table ends the log."""
    from irmlens.pipeline import STAGES
    from irmlens.records import stage_timings, timing_table

    r = json.loads((micro_run / "report/report.json").read_text())
    t = r["timings"]
    recorded = {p.stem for p in (micro_run / ".records").glob("*.json")} - {"report"}
    assert sorted(s["stage"] for s in t["stages"]) == sorted(recorded)
    assert recorded >= {"rlhf", "null", "cache", "saes", "irm", "validate", "labels"}
    ran = {s["stage"]: s["seconds"] for s in t["stages"]}
    assert ran["rlhf"] > 0 and ran["saes"] > 0 and ran["validate"] > 0
    assert t["total_seconds"] == pytest.approx(sum(v or 0 for v in ran.values()))
    m = t["machines"][0]
    assert m["cpu_count"] >= 1 and m["torch_threads"] >= 1 and m["cpu"]
    assert "Stage timings" in (micro_run / "report/index.html").read_text()
    table = timing_table(stage_timings(micro_run, [s.name for s in STAGES]))
    assert table.splitlines()[0].split() == ["stage", "seconds", "share"]
    assert table.splitlines()[-1].startswith("total")

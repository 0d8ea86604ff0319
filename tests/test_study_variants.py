"""Studies beside the default: MLP outputs (the paper's hook) and a pair whose reward model is
unknown (``data.lexicon = "none"``), run end to end (both in one study) on the micro study's own
pair (given as ``model.rlhf`` / ``model.null``, so nothing is trained twice)."""

import json
import math
import tomllib
from pathlib import Path

import pytest

from irmlens.cli import main
from irmlens.config import config_from_dict, dump_config
from irmlens.errors import ConfigError
from irmlens.run import RunPaths

MICRO = Path(__file__).parent / "micro.toml"


def _variant(micro_run: Path, tmp_path: Path, **sections) -> Path:
    """The micro config on the micro run's pair, with ``sections`` merged in."""
    values = tomllib.loads(MICRO.read_text())
    paths = RunPaths(micro_run)
    values["model"] = {"rlhf": str(paths.rlhf_model), "null": str(paths.null_model)}
    for name, table in sections.items():
        values.setdefault(name, {}).update(table)
    path = tmp_path / "variant.toml"
    path.write_text(dump_config(config_from_dict(values)))
    return path


def _report(run: Path) -> dict:
    return json.loads((run / "report/report.json").read_text())


@pytest.fixture(scope="module")
def variant_run(micro_run, tmp_path_factory):
    """One study of both variants (one run keeps `make test` short): the micro pair with no RM
    (``data.lexicon = "none"``), MLP outputs studied and the residual stream beside them."""
    tmp = tmp_path_factory.mktemp("variant")
    cfg = _variant(
        micro_run,
        tmp,
        data={"lexicon": "none"},
        cache={"hook_kinds": ["mlp_out", "resid_post"]},
    )
    run = tmp / "rmfree-mlp"
    assert main(["run", str(cfg), "--out", str(run)]) == 0
    return run


def test_an_mlp_out_study_runs_every_stage_and_reports_the_irm_per_hook_kind(variant_run):
    r = _report(variant_run)
    layer = r["irm"]["layer"]
    assert r["irm"]["hook"] == f"blocks.{layer}.hook_mlp_out"
    kinds = r["irm"]["hook_kinds"]
    assert list(kinds) == ["mlp_out", "resid_post"]
    for kind, row in kinds.items():
        assert row["hook"] == f"blocks.{layer}.hook_{kind}" and math.isfinite(
            row["heldout_kendall_tau"]
        )
        assert {s["name"] for s in row["spaces"]} >= {"sae_codes", "raw_difference"}
    # the studied kind has every dictionary; the other only the widest shared and base ones
    mlp, resid = f"blocks.{layer}.hook_mlp_out", f"blocks.{layer}.hook_resid_post"
    got = {(s["hook"], s["model"], s["width"]) for s in r["saes"]}
    assert {(h, m) for h, m, _ in got if h == mlp} >= {(mlp, m) for m in ("base", "rlhf", "shared")}
    assert {(m, w) for h, m, w in got if h == resid} == {("base", 128), ("shared", 128)}
    shared_mlp = [s for s in r["saes"] if s["hook"] == mlp and s["model"] == "shared"]
    assert all(s["explained_variance"] > 0.5 for s in shared_mlp)
    # the validation's edits sit on the MLP output (tests/test_interventions.py checks the site)
    ablated = next(a for a in r["validation"]["arms"] if a["kind"] == "ablate")
    # a sampled KL estimate: an edit with no effect gives exactly 0; a small one may come out
    # negative (-0.028 on an Intel Xeon, positive on an AMD EPYC)
    assert abs(ablated["kl_to_unintervened"]) > 1e-6
    html = (variant_run / "report/index.html").read_text()
    assert r["feature_cards"] and "IRM per hook kind" in html


def test_a_study_without_a_reward_model_explains_the_pairs_implicit_reward(variant_run, micro_run):
    r = _report(variant_run)
    assert r["reward_model"]["true_reward_model"] is False
    assert "no reward model" in r["reward_model"]["target"]
    ref = r["irm"]["reference"]["model_implicit_reward"]
    assert ref["is_the_target"] and ref["heldout_kendall_tau"] == pytest.approx(1.0)
    assert "rm_free_irm" not in r["irm"]["reference"]
    # the target is the implicit reward of every word seen 3 times: many more than VADER's
    table = (variant_run / "target/implicit_reward.tsv").read_text().splitlines()[1:]
    targets = [ln for ln in table if int(ln.split("\t")[2]) >= 3]
    n_words = r["irm"]["n_fit_words"] + r["irm"]["n_heldout_words"]
    vader = _report(micro_run)["irm"]
    assert n_words == len(targets) > vader["n_fit_words"] + vader["n_heldout_words"]
    # the micro pair's implicit reward is weakly readable from its activations (tau 0.07 on the
    # MLP outputs, 0.09 on the residual stream when this test was written), but above the same
    # fit to shuffled targets (-0.18)
    shuffled = r["controls"]["shuffled_targets"]["heldout_kendall_tau"]
    assert r["irm"]["heldout_kendall_tau"] > shuffled + 0.1
    for name in ("random_sae", "base_only", "null_pair", "shuffled_targets"):
        assert math.isfinite(r["controls"][name]["heldout_kendall_tau"])
    assert r["validation"]["reward_rlhf"] > r["validation"]["reward_base"]
    assert r["labels"]["comparison"]["all"]["lexicon"]["n"] > 0
    page = (variant_run / "report/index.html").read_text()
    assert "no reward model was given" in page.lower()


def test_an_rm_free_report_never_speaks_of_a_reward_model_it_was_not_given(variant_run):
    from irmlens.report.summary import tau_bars

    r = _report(variant_run)
    page = (variant_run / "report/index.html").read_text()
    md = (variant_run / "report/summary.md").read_text()
    for text in (page, md):
        for wording in ("reward model it was trained on", "true utility", "vs the reward model"):
            assert wording not in text, wording
    assert "the pair's implicit reward" in page
    # the target scored against itself (tau 1.000) is no reference bar
    assert "model implicit reward" not in [b["name"] for b in tau_bars(r)]


def test_the_lexicon_study_reports_the_rm_free_irm_against_the_rm(micro_run):
    """The RM-free IRM is scored, and the implicit-reward reference is the target stage's table
    scored against VADER on the held-out words (recomputed here from the two files)."""
    from irmlens.irm.metrics import kendall_tau
    from irmlens.irm.words import read_word_utilities
    from irmlens.stages.target import read_implicit

    ref = _report(micro_run)["irm"]["reference"]
    row = ref["rm_free_irm"]
    assert math.isfinite(row["heldout_kendall_tau"]) and len(row["difference_ci"]) == 2
    table = read_implicit(RunPaths(micro_run))
    held = [w for w in read_word_utilities(micro_run) if w["split"] == "heldout"]
    held = [w for w in held if w["word"] in table]
    tau = kendall_tau([table[w["word"]][0] for w in held], [w["true_utility"] for w in held])
    assert tau == pytest.approx(ref["model_implicit_reward"]["heldout_kendall_tau"], abs=1e-6)


def test_an_rm_free_study_needs_the_pair(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.lexicon = 'none'.*model\.rlhf"):
        config_from_dict({"data": {"lexicon": "none"}})


# slow: a second micro study (~20 s); make test keeps the offline check of a SAELens source
# against its directory
@pytest.mark.slow
def test_a_saelens_sae_given_as_sae_source_is_the_studys_shared_dictionary(micro_run, tmp_path):
    """Bring your own dictionary: an SAE trained by ``sae-train`` on the micro cache (saved by
    sae_lens, which loads it back), given as ``sae.source``, is copied bit for bit as the shared
    dictionary at its hook, becomes the IRM's, and the study runs to its report."""
    import hashlib

    from sae_lens import SAE

    from sae_training.cli import main as sae_train

    layer = _report(micro_run)["irm"]["layer"]
    hook = f"blocks.{layer}.hook_resid_post"
    folder = tmp_path / "my-sae"
    args = ["--cache", str(micro_run / "cache"), "--model", "base", "--model", "rlhf"]
    args += ["--hook", hook, "--width", "3x", "--epochs", "2", "--batch-size", "256"]
    assert sae_train([*args, "--out", str(folder)]) == 0
    assert SAE.load_from_disk(str(folder)).cfg.d_sae == 192
    sae = {
        "source": str(folder),
        "width_multipliers": [1],
        "crosscoder": {"architecture": "none"},
        "wide_topk": {"k": 0},
    }
    cfg = _variant(micro_run, tmp_path, sae=sae, irm={"n_shuffles": 1})
    run = tmp_path / "byo"
    assert main(["run", str(cfg), "--out", str(run)]) == 0
    r = _report(run)
    assert r["irm"]["layer"] == layer and r["irm"]["sae"] == {"model": "shared", "width": 192}
    given = [s for s in r["saes"] if s["model"] == "shared" and s["width"] == 192]
    assert len(given) == 1 and given[0]["explained_variance"] > 0.5
    assert {s["width"] for s in r["saes"]} == {64, 192}  # base and rlhf trained at both widths

    def sha(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()

    copied = RunPaths(run).sae_dir("shared", hook, 192)
    assert sha(copied / "sae_weights.safetensors") == sha(folder / "sae_weights.safetensors")
    assert json.loads((copied / "metrics.json").read_text())["source"] == str(folder)
    assert math.isfinite(r["irm"]["heldout_kendall_tau"]) and r["validation"]["arms"]


def _fake_sae(folder: Path, hook: str, d_in: int = 64, d_sae: int = 128) -> Path:
    folder.mkdir(parents=True)
    cfg = {"d_in": d_in, "d_sae": d_sae, "architecture": "standard"}
    cfg["metadata"] = {"hook_name": hook}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    (folder / "sae_weights.safetensors").write_bytes(b"")
    return folder


@pytest.mark.parametrize(
    "hook, sae, match",
    [
        ("blocks.1.hook_resid_post", {"source": "/nonexistent/sae"}, "is not a folder"),
        ("blocks.1.hook_mlp_out", {}, "put 'mlp_out' first in cache.hook_kinds"),
        ("blocks.1.attn.hook_z", {}, "is not a block hook"),
        ("blocks.7.hook_resid_post", {}, "has 2 layers"),
        ("blocks.1.hook_resid_post", {"width_multipliers": [4]}, "wider than sae.source's 128"),
    ],
)
def test_a_bad_sae_source_fails_at_load_naming_the_fix(tmp_path, hook, sae, match):
    values = tomllib.loads(MICRO.read_text())
    values["sae"] |= {"source": str(_fake_sae(tmp_path / "sae", hook)), **sae}
    with pytest.raises((ConfigError, ValueError), match=match):
        config_from_dict(values)
    wrong_width = _fake_sae(tmp_path / "wide", "blocks.1.hook_resid_post", d_in=32)
    values["sae"] |= {"source": str(wrong_width), "width_multipliers": [1, 2]}
    with pytest.raises((ConfigError, ValueError), match="has d_model 64"):
        config_from_dict(values)


@pytest.mark.parametrize(
    "source, match",
    [
        ("gpt2-small-res-jbx:blocks.0.hook_resid_pre", "nearest: gpt2-small-res-jb"),
        ("gpt2-small-res-jb:blocks.99.hook_resid_pre", "has no SAE 'blocks.99.hook_resid_pre'"),
        ("gpt2-small-res-jb:blocks.0.hook_resid_pre", "HF_HUB_OFFLINE is set"),
    ],
)
def test_a_saelens_release_id_as_source_is_checked_against_its_directory_offline(
    tmp_path, monkeypatch, source, match
):
    """``sae.source = "<release>:<sae id>"``: SAELens's pretrained-SAE directory ships with
    sae-lens, so a wrong release or id fails at load with the nearest names, and a right one
    says how to download it when the hub is off (the download itself needs a network)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("IRMLENS_HOME", str(tmp_path / "home"))
    values = tomllib.loads(MICRO.read_text())
    values["sae"] |= {"source": source}
    with pytest.raises(ConfigError, match=match):
        config_from_dict(values)

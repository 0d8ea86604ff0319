"""The mediate stage on a copy of the micro run, and the layer selection it offers (issue 30):
``layers.select = "mediation"`` studies the layers whose output carries most of the gain, as the
sweep measures it; the stage's outputs agree with their own parts."""

import dataclasses
import shutil

import pytest

from irmlens.config import config_from_dict, load_config
from irmlens.io import read_json
from irmlens.run import RunPaths
from irmlens.stages import layers as layers_stage
from irmlens.stages.context import StudyContext


def test_mediation_selection_studies_the_layers_that_carry_most(micro_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(micro_run, run)
    paths = RunPaths(run)
    cfg = load_config(paths.config)
    cfg = dataclasses.replace(cfg, layers=dataclasses.replace(cfg.layers, select="mediation"))
    layers_stage.run(StudyContext(cfg, paths))
    found = read_json(paths.diff / "layers.json")
    share = {int(r["site"].split(".")[1]): r["removed"] for r in found["mediation_sweep"]["sites"]}
    assert found["select"] == "mediation"
    assert found["ranking"] == sorted(share, key=lambda la: (-share[la], la))
    assert found["studied_layers"] == sorted(found["ranking"][: cfg.layers.top_k])
    # the gain is the pair's: the sweep measured a gain and the ranking is not the identity's
    assert found["mediation_sweep"]["rlhf"] != found["mediation_sweep"]["base"]


def test_mediation_selection_needs_a_reward_model():
    with pytest.raises(Exception, match="layers.select = 'mediation'"):
        config_from_dict(
            {
                "data": {"lexicon": "none"},
                "model": {"rlhf": "/some/folder"},
                "layers": {"select": "mediation"},
            },
            check_device=False,
        )


def test_the_stage_reports_what_its_parts_measured(micro_run):
    m = read_json(RunPaths(micro_run).mediate / "mediation.json")
    texts = {(s["text"], s["metric"]) for s in m["sweeps"]}
    assert texts == {
        (t, k)
        for t in ("cached_rows", "own_completions")
        for k in ("expected_utility", "implicit_reward")
    }
    assert m["sweep"] in m["sweeps"]
    if (RunPaths(micro_run).diff / "crosscoder.json").exists():  # read as a basis of the change
        irm_layer = str(read_json(RunPaths(micro_run).irm_metrics)["layer"])
        assert m["layers"][irm_layer]["bases"]["crosscoder"]["dictionary"]
    for s in m["sweeps"]:
        assert s["rlhf"] != s["base"], s  # the tuning moved every metric on every text
    for la, res in m["layers"].items():
        # every trained dictionary through the registry (the difference SAE too), beside the
        # bases that need no training
        bases = res["bases"]
        for name in ("shared", "base", "difference", "random_sae"):
            assert bases[name]["dictionary"], name
        for name in ("standard", "random_rotation", "pca_of_differences", "mean_difference"):
            assert not bases[name]["dictionary"], name
        placed = {p["set"] for p in res["validation_sets"]}
        assert "sparse_irm" in placed and len(placed) >= 3, placed
        assert m["studied"]["layers"][la] == next(
            r["removed"] for r in m["sweep"]["sites"] if r["site"] == f"blocks.{la}.hook_resid_post"
        )
        for direction, c in res["comparison"].items():
            assert c["dictionary"] in res["bases"] and c["other"] in res["bases"]
            assert not res["bases"][c["other"]]["dictionary"]
            lo, hi = c["area"]["ci"]
            assert lo <= c["area"]["difference"] <= hi, (direction, c)
        rd = res["reward_direction"]
        assert len(rd["contexts"]) > 0 and rd["unembedding"]["promoted"]
        if "features" in rd:
            sizes = [c["n_features"] for c in rd["features"]["cumulative"]]
            assert sizes == sorted(sizes) and all(
                f["layer"] == int(la) and f["dictionary"] == "shared" for f in rd["features"]["top"]
            )


def test_the_stage_gives_the_same_numbers_twice(micro_run, tmp_path):
    """Issue 30's "two runs give identical numbers": the stage rerun on a copy of the micro run
    writes the mediation the pipeline wrote, digit for digit (its own seconds aside)."""
    from irmlens.stages import mediate

    run = tmp_path / "copy"
    shutil.copytree(micro_run, run)
    paths = RunPaths(run)
    mediate.run(StudyContext(load_config(paths.config), paths, frozenset({"mediate"})))
    first = read_json(RunPaths(micro_run).mediate / "mediation.json")
    again = read_json(paths.mediate / "mediation.json")
    first.pop("seconds"), again.pop("seconds")
    assert again == first


def test_every_width_adds_each_width_of_each_models_dictionary(micro_run):
    """``mediate.every_width``: beside the registry's dictionaries, every width of the shared,
    base and RLHF SAEs is a basis of the comparison (the widest shared and base ones once)."""
    import torch

    from irmlens.stages.mediate import _bases

    paths = RunPaths(micro_run)
    cfg = load_config(paths.config)
    cfg = dataclasses.replace(cfg, mediate=dataclasses.replace(cfg.mediate, every_width=True))
    ctx = StudyContext(cfg, paths)
    layer = sorted(ctx.studied_layers)[0]
    fit = torch.randn(4, 8, ctx.d_model)
    found = _bases(ctx, layer, fit, fit + 0.1)
    narrow, widest = ctx.widths[0], ctx.widest
    want = {f"rlhf_w{w}" for w in ctx.widths} | {f"shared_w{narrow}", f"base_w{narrow}"}
    assert want <= set(found) and f"shared_w{widest}" not in found, sorted(found)
    assert all(found[n][1] for n in want)  # each a dictionary
    assert found[f"rlhf_w{widest}"][0].cfg.d_sae == widest

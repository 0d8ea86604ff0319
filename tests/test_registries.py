"""Issue 29: a new basis kind and a new validation control are registry entries only. Both are
added here, from outside the library (no library file edited), to a copy of the micro run; the
IRM, validate and report stages are rerun, and both are found in report.json and in the HTML."""

import shutil

import torch

from irmlens.bases import BASES, BasisKind, error_term, n_components
from irmlens.cli import main
from irmlens.io import read_json
from irmlens.irm.spaces import SPACES, SpaceSpec
from irmlens.validate.sets import SETS, FeatureSet, SetSpec


class RandomDirections:
    """A toy basis: ``k`` random orthonormal directions of the residual stream (a projection)."""

    def __init__(self, d_model: int, k: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(d_model, k, generator=g))
        self.W_dec = q.T.contiguous()  # [k, d_model], orthonormal rows
        self.cfg = type("Cfg", (), {"d_sae": k})()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() @ self.W_dec.T

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes @ self.W_dec


def _load_directions(source, layers, kind):
    return [(RandomDirections(source.d_model, 8, seed=la), None) for la in layers]


def _last_features(inputs, built):
    """The toy control: the shared dictionary's last features at the IRM layer, as many as
    the main set has."""
    la, k = inputs.irm_layer, sum(fs.size for fs in built["sparse_irm"])
    sae = inputs.dictionary("shared", la)
    d = sae.cfg.d_sae
    return [
        FeatureSet(
            "toy_last_features",
            f"the shared SAE's last {k} features (a toy control)",
            {la: sae},
            {la: list(range(d - k, d))},
            "trained",
            SETS["toy_last_features"],
        )
    ]


def test_the_toy_basis_is_a_basis():
    basis = RandomDirections(16, 4, seed=0)
    x = torch.randn(5, 16)
    assert n_components(basis) == 4
    # a projection: what it explains and its error term are orthogonal and add up to x
    err = error_term(basis, x)
    assert torch.allclose(basis.decode(basis.encode(x)) + err, x, atol=1e-6)
    assert basis.encode(err).abs().max() < 1e-5


def test_a_basis_kind_and_a_control_added_from_a_test_reach_the_report(
    micro_run, tmp_path, monkeypatch
):
    run = tmp_path / "copy"
    shutil.copytree(micro_run, run)
    kind = BasisKind(
        "toy_directions",
        "8 random orthonormal directions of the residual stream",
        _load_directions,
        "toy_directions",
        short="toy random directions",
    )
    space = SpaceSpec(
        "toy_directions_codes",
        "codes",
        "toy_directions",
        False,
        False,
        lambda inputs: "projections on 8 random orthonormal directions, rlhf - base",
    )
    monkeypatch.setitem(BASES, kind.name, kind)
    monkeypatch.setitem(SPACES, space.name, space)
    monkeypatch.setitem(SETS, "toy_last_features", SetSpec("toy_last_features", _last_features))

    assert main(["irm", str(run), "--force"]) == 0
    assert main(["validate", str(run), "--force"]) == 0
    assert main(["report", str(run)]) == 0

    report = read_json(run / "report/report.json")
    page = (run / "report/index.html").read_text(encoding="utf-8")
    # the basis kind: an IRM space over it, described from its registry entry
    (row,) = [r for r in report["feature_spaces"] if r["space"] == "toy_directions_codes"]
    assert row["dictionary"] == "toy random directions" and row["n_features"] == 8
    assert -1 <= row["heldout_kendall_tau"] <= 1
    assert any(s["name"] == "toy_directions_codes" for s in report["irm"]["spaces"])
    assert "toy_directions_codes" in page and "projections on 8 random orthonormal" in page
    # the control: its set, its arms (ablated, and steered at scale 1 only), its findings
    validation = report["validation"]
    assert validation["feature_sets"]["toy_last_features"]["dictionary"] == "trained"
    arms = {a["arm"]: a for a in validation["arms"]}
    assert [a for a in arms if "toy_last_features" in a] == [
        "ablate:toy_last_features",
        "steer:toy_last_features@1",
    ]
    assert arms["ablate:toy_last_features"]["n_features"] == arms["ablate:sparse_irm"]["n_features"]
    assert "main_minus_this" in arms["ablate:toy_last_features"]
    assert {f["kind"] for f in validation["findings"] if f["control"] == "toy_last_features"} == {
        "ablate",
        "steer",
    }
    assert "ablate:toy_last_features" in page and "a toy control" in page


def test_a_candidate_space_needs_a_basis_kind_with_a_random_stand_in(monkeypatch):
    """The main IRM's controls are built from random stand-ins of its basis: a candidate space
    over a kind without one is refused when registered; with one, irm.space may name it (the
    config's rule reads the registry as it is, not as it was at import)."""
    import dataclasses

    import pytest

    from irmlens.config import config_from_dict
    from irmlens.errors import ConfigError
    from irmlens.irm.spaces import register_space

    kind = BasisKind("toy_directions", "8 random directions", _load_directions, "toy_directions")
    monkeypatch.setitem(BASES, kind.name, kind)
    monkeypatch.setattr("irmlens.irm.spaces.SPACES", dict(SPACES))
    from irmlens.irm import spaces

    spec = SpaceSpec("toy_codes", "codes", "toy_directions", False, True, lambda i: "toy")
    with pytest.raises(ValueError, match="no random stand-in"):
        register_space(spec)
    with pytest.raises(ConfigError, match=r"irm\.space = 'toy_codes' must be one of"):
        config_from_dict({"irm": {"space": "toy_codes"}}, check_device=False)

    def stand_in(basis, folder, seed, d_model):
        return RandomDirections(d_model, basis.cfg.d_sae, seed=1000 + seed)

    monkeypatch.setitem(BASES, kind.name, dataclasses.replace(kind, random_stand_in=stand_in))
    register_space(spec)
    assert "toy_codes" in spaces.SPACES
    cfg = config_from_dict({"irm": {"space": "toy_codes"}}, check_device=False)
    assert cfg.irm.space == "toy_codes"

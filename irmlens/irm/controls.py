"""The controls every IRM is reported beside, each derived from the chosen feature space.

A control answers "would this result appear without what the IRM claims to have found?". Each is
one ``ControlSpec`` in ``CONTROLS``; the scored row (held-out tau, Spearman, CV R^2 and the paired
bootstrap CI of main tau minus the control's) goes into ``irm/metrics.json`` under its name. A
result that a control also reaches is not a finding (``irmlens.report.summary.verdict``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from irmlens.bases import BASES
from irmlens.irm.fit import IRMConfig, fit_and_score, shuffled_target_control, sparse_irm
from irmlens.irm.metrics import bootstrap_tau_ci
from irmlens.irm.spaces import FeatureSpace, SpaceInputs, SpaceSpec


def score_row(fit, main, targets, seed: int) -> dict:
    """A control or reference scored like the main IRM, with the paired bootstrap CI of
    (main tau - its tau) over held-out words."""
    row = {
        "heldout_kendall_tau": fit.heldout_kendall_tau,
        "heldout_spearman": fit.heldout_spearman,
        "cv_r2": fit.cv_r2,
    }
    if main is not None:
        row["difference_ci"] = list(
            bootstrap_tau_ci(main.heldout_irm, targets.utility, other=fit.heldout_irm, seed=seed)
        )
    return row


def retention(tau: float, ref: float) -> float | None:
    """How much of the reference's tau a space keeps (None when the reference has none)."""
    return tau / ref if ref > 0 else None


@dataclass
class ControlContext:
    """What the controls are built from: the chosen space (its spec, matrices and fit), the
    inputs, the targets and split, and, once fitted, the sparse IRM and its features."""

    spec: SpaceSpec
    chosen: FeatureSpace
    main: object  # the chosen space's IRMFit
    inputs: SpaceInputs
    targets: object
    split: object
    icfg: IRMConfig
    seed: int
    d_model: int
    sparse: object = None  # the sparse IRM's fit, set before the sparse controls run
    cache: dict = field(default_factory=dict)

    def random_space(self) -> FeatureSpace:
        """The chosen construction on random dictionaries of the same widths and kinds (built
        once: the dense and the sparse random controls share it)."""
        if "random" not in self.cache:
            stand_in = BASES[self.spec.dictionary].random_stand_in
            sources = self.spec.sources(self.inputs)
            randoms = [
                stand_in(basis, folder, _random_seed(self, i), self.d_model)
                for i, (basis, folder) in enumerate(sources)
            ]
            self.cache["random"] = self.spec.build(
                self.inputs,
                saes=randoms,
                name="random_sae",
                description="random untrained SAE, same width and construction",
            )
        return self.cache["random"]

    def random_feature_ref(self, col: int) -> dict:
        """Column ``col`` of the random space: the trained dictionary it stands in for (its
        layer, feature and folder label) and the seed that rebuilds it (``random_sae``), so a
        later stage can intervene with the very same random features."""
        ref = self.spec.feature_ref(col, self.inputs)
        layers = [self.inputs.layers[i] for i in self.spec.layer_indices(self.inputs)]
        source = layers.index(ref["layer"]) if len(self.spec.sources(self.inputs)) > 1 else 0
        return ref | {"random_seed": _random_seed(self, source)}


def _random_seed(ctx: ControlContext, source: int) -> int:
    """The seed of the random dictionary standing in for the space's ``source``-th one."""
    return ctx.seed + 1 + source


def _fitted(ctx: ControlContext, space: FeatureSpace) -> dict:
    f = fit_and_score(space.fit, space.held, ctx.targets, ctx.split, ctx.icfg)
    return score_row(f, ctx.main, ctx.targets, ctx.icfg.seed) | {"description": space.description}


def _shuffled_targets(ctx: ControlContext) -> dict:
    return shuffled_target_control(
        ctx.chosen.fit, ctx.chosen.held, ctx.targets, ctx.split, ctx.icfg
    )


def _random_sae(ctx: ControlContext) -> dict:
    return _fitted(ctx, ctx.random_space())


def _base_only(ctx: ControlContext) -> dict:
    space = ctx.spec.build(
        ctx.inputs,
        base_only=True,
        name="base_only",
        description="base-model features only (no difference)",
    )
    return _fitted(ctx, space)


def _null_pair(ctx: ControlContext) -> dict | None:
    if "null" not in ctx.inputs.acts:
        return None
    space = ctx.spec.build(
        ctx.inputs,
        model="null",
        name="null_pair",
        description="null model - base, same construction",
    )
    return _fitted(ctx, space)


def _random_sae_sparse(ctx: ControlContext) -> dict:
    rsp = ctx.random_space()
    k = ctx.icfg.sparse_k
    rsparse, feats = sparse_irm(
        rsp.fit, rsp.held, ctx.targets, ctx.split, ctx.icfg, k, rsp.n_features
    )
    return score_row(rsparse, ctx.sparse, ctx.targets, ctx.icfg.seed) | {
        "k": k,
        "description": "the sparse-IRM selection on the random SAE's features",
        "features": feats,
        "feature_refs": [ctx.random_feature_ref(j) for j in feats],
    }


@dataclass(frozen=True)
class ControlSpec:
    """One control: its name in metrics.json, and how it is scored (None: not applicable to this
    study, e.g. no null model). ``of_sparse``: it controls the sparse IRM, so it runs after it.
    ``verdict``: how the IRM must beat it for a finding (``irmlens.report.summary.verdict``):
    ``"margin"`` by more than 2 of its standard deviations over permutations, ``"paired"`` with a
    paired CI of the difference that excludes 0; ``None``: it does not enter the verdict (the
    sparse IRM's control is reported beside the sparse IRM)."""

    name: str
    run: Callable[[ControlContext], dict | None]
    of_sparse: bool = False
    verdict: str | None = "paired"


CONTROLS: dict[str, ControlSpec] = {}


def register_control(spec: ControlSpec) -> ControlSpec:
    """Add (or replace) a control; every IRM fitted after this call is reported beside it."""
    CONTROLS[spec.name] = spec
    return spec


for _spec in (
    ControlSpec("shuffled_targets", _shuffled_targets, verdict="margin"),
    ControlSpec("random_sae", _random_sae),
    ControlSpec("base_only", _base_only),
    ControlSpec("null_pair", _null_pair),
    ControlSpec("random_sae_sparse", _random_sae_sparse, of_sparse=True, verdict=None),
):
    register_control(_spec)


def run_controls(ctx: ControlContext, of_sparse: bool) -> dict[str, dict]:
    """The scored rows of the controls of the main IRM (or of the sparse IRM), in registry order."""
    rows = {}
    for spec in CONTROLS.values():
        if spec.of_sparse == of_sparse and (row := spec.run(ctx)) is not None:
            rows[spec.name] = row
    return rows

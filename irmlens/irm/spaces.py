"""Feature spaces an IRM can be fitted in, all built on the same fit/held-out positions.

The paper fits the IRM on post-ReLU SAE codes. RLHF also moves features *below* their firing
threshold, which post-ReLU codes cannot show, and the SAE's reconstruction error carries whatever
the dictionary missed. Each space here is one answer to "which representation of the change keeps
the implicit reward?"; the pipeline fits the same ridge in each and reports them side by side.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from irmlens.bases import BASES
from irmlens.ranges import Rule
from sae_training.crosscoder import CrosscoderReading
from sae_training.train import encode_batched

SAE_KINDS = ("codes", "pre", "codes+error")


@dataclass
class FeatureSpace:
    name: str
    description: str
    fit: torch.Tensor  # [n_fit_positions, d]
    held: torch.Tensor  # [n_heldout_positions, d]
    n_features: int  # leading columns that are dictionary features (the rest: error dims etc.)
    selectable: bool = True  # a candidate for the default IRM (controls and references are not)


@torch.no_grad()
def sae_representation(sae, acts: torch.Tensor, kind: str) -> torch.Tensor:
    """Codes (post-nonlinearity), encoder pre-activations, or codes followed by the SAE error."""
    if kind == "pre":
        return encode_batched(sae, acts, pre_activation=True)
    codes = encode_batched(sae, acts)
    if kind == "codes":
        return codes
    if kind == "codes+error":
        recon = torch.cat(
            [sae.decode(codes[i : i + 8192]).cpu() for i in range(0, len(codes), 8192)]
        )
        return torch.cat([codes, acts - recon], dim=1)
    raise ValueError(f"SAE representation {kind!r}; choose one of {SAE_KINDS}")


def difference_space(
    name: str,
    description: str,
    saes: Sequence,
    base: Sequence[torch.Tensor],
    rlhf: Sequence[torch.Tensor] | None,
    positions: tuple[torch.Tensor, torch.Tensor],
    kind: str,
    selectable: bool = True,
) -> FeatureSpace:
    """``rep(rlhf) - rep(base)`` (or ``rep(base)`` alone when ``rlhf`` is None), one SAE per layer,
    layers concatenated; ``saes`` may hold ``None`` for the raw activations."""
    parts = {"fit": [], "held": []}
    n_features = 0
    for i, sae in enumerate(saes):
        for key, p in zip(("fit", "held"), positions, strict=True):
            rep_b = base[i][p] if sae is None else sae_representation(sae, base[i][p], kind)
            if rlhf is None:
                parts[key].append(rep_b)
            else:
                rep_r = rlhf[i][p] if sae is None else sae_representation(sae, rlhf[i][p], kind)
                parts[key].append(rep_r - rep_b)
        n_features += base[i].shape[1] if sae is None else sae.cfg.d_sae
    fit, held = torch.cat(parts["fit"], dim=1), torch.cat(parts["held"], dim=1)
    if kind == "codes+error" and len(saes) > 1:
        raise ValueError("codes+error spaces are built for one layer at a time")
    return FeatureSpace(name, description, fit, held, n_features, selectable)


def crosscoder_space(
    name: str,
    description: str,
    reading: CrosscoderReading,
    acts: dict[str, torch.Tensor],
    positions: tuple[torch.Tensor, torch.Tensor],
    model: str = "rlhf",
    selectable: bool = False,
) -> FeatureSpace:
    """``reading.change`` at the fit and held-out positions: the crosscoder's codes minus its
    codes with ``model``'s activation replaced by the base's (``acts``: every model's, at one
    layer)."""
    fit, held = (reading.change({m: a[p] for m, a in acts.items()}, model) for p in positions)
    return FeatureSpace(name, description, fit, held, reading.cfg.d_sae, selectable)


# ---------------------------------------------------------------- the registry


@dataclass(frozen=True)
class SpaceInputs:
    """What the feature spaces are built from, for one study: activations per model and studied
    layer (sorted), the bases by kind (``irmlens.bases.BASES``: ``shared`` and ``raw`` one per
    layer, the others the IRM layer's, absent when the study has none), their labels in feature
    references, and the fit and held-out positions."""

    layers: list[int]
    layer_index: int  # the IRM layer's index in ``layers``
    acts: dict[str, list[torch.Tensor]]  # model -> one [n_positions, d_model] tensor per layer
    dictionaries: dict[
        str, list[tuple[object, Path]]
    ]  # basis kind -> (basis, its folder) per layer used
    labels: dict[str, str]  # basis kind -> its name in feature references
    positions: tuple[torch.Tensor, torch.Tensor]
    kind: str = "resid_post"  # the hook kind of the activations (cache.hook_kinds)

    @property
    def layer(self) -> int:
        return self.layers[self.layer_index]


@dataclass(frozen=True)
class SpaceSpec:
    """One way to represent the change between the checkpoints: ``representation`` (``codes``,
    ``pre`` or ``codes+error``, see ``sae_representation``) of the dictionary with role
    ``dictionary`` (``raw``: the activations themselves), at the IRM layer or at every studied
    layer (``all_layers``), as rlhf - base. ``selectable``: a candidate for the main IRM (the raw
    spaces are references). ``describe`` says what it is, given the inputs."""

    name: str
    representation: str
    dictionary: str
    all_layers: bool
    selectable: bool
    describe: Callable[[SpaceInputs], str]

    def unmet(self, cfg) -> str | None:
        """Why a study with config ``cfg`` cannot have this space (None: it can)."""
        if self.all_layers and cfg.layers.top_k < 2:
            return (
                f"concatenates several layers, but layers.top_k = {cfg.layers.top_k}: set "
                "layers.top_k >= 2"
            )
        kind = BASES.get(self.dictionary)
        if kind is None:
            return f"reads basis kind {self.dictionary!r}, which is not registered"
        if self.selectable and kind.random_stand_in is None:
            return f"reads basis kind {kind.name!r}, which has no random stand-in for its controls"
        return kind.unmet(cfg)

    def available(self, inputs: SpaceInputs) -> bool:
        if self.all_layers and len(inputs.layers) < 2:
            return False
        return bool(inputs.dictionaries.get(self.dictionary))

    def layer_indices(self, inputs: SpaceInputs) -> list[int]:
        return list(range(len(inputs.layers))) if self.all_layers else [inputs.layer_index]

    def sources(self, inputs: SpaceInputs) -> list[tuple[object, Path | None]]:
        """The dictionaries (with their folders) this space reads, one per layer it covers."""
        idx = self.layer_indices(inputs)
        found = inputs.dictionaries[self.dictionary]
        return found if self.all_layers or len(found) == 1 else [found[i] for i in idx]

    def build(
        self,
        inputs: SpaceInputs,
        saes: Sequence | None = None,
        model: str = "rlhf",
        base_only: bool = False,
        name: str | None = None,
        description: str | None = None,
    ) -> FeatureSpace:
        """The space's fit/held-out matrices: ``rep(model) - rep(base)``, or ``rep(base)`` alone.
        ``saes`` replaces the space's own dictionaries (the controls: a random one, the same
        construction on the null pair)."""
        idx = self.layer_indices(inputs)
        saes = [s for s, _ in self.sources(inputs)] if saes is None else list(saes)
        if self.representation == "crosscoder":
            if base_only or len(saes) != 1:
                raise ValueError("a crosscoder space reads one layer's change between two models")
            return crosscoder_space(
                name or self.name,
                description or self.describe(inputs),
                saes[0],
                {m: a[idx[0]] for m, a in inputs.acts.items()},
                inputs.positions,
                model,
                self.selectable and name is None,
            )
        return difference_space(
            name or self.name,
            description or self.describe(inputs),
            saes,
            [inputs.acts["base"][i] for i in idx],
            None if base_only else [inputs.acts[model][i] for i in idx],
            inputs.positions,
            self.representation,
            self.selectable and name is None,
        )

    def feature_ref(self, col: int, inputs: SpaceInputs) -> dict:
        """Which dictionary, layer and feature column ``col`` of this space is."""
        layers = [inputs.layers[i] for i in self.layer_indices(inputs)]
        source = self.sources(inputs)[0][0]
        d_sae = source.cfg.d_sae
        if self.representation == "codes+error" and col >= d_sae:
            return {"dictionary": "sae_error", "layer": layers[0], "local_feature": col - d_sae}
        local = col % d_sae
        if isinstance(source, CrosscoderReading):  # a subset's column -> the crosscoder's latent
            local = source.latent_id(local)
        return {
            "dictionary": inputs.labels[self.dictionary],
            "layer": layers[col // d_sae],
            "local_feature": local,
        }

    @property
    def reference(self) -> str:
        """The raw-difference reference over the same layers (signal retention is against it)."""
        return "raw_difference_layers" if self.all_layers else "raw_difference"


def _layers_text(inputs: SpaceInputs) -> str:
    return str(inputs.layers)


SPACES: dict[str, SpaceSpec] = {
    spec.name: spec
    for spec in (
        SpaceSpec(
            "sae_codes",
            "codes",
            "shared",
            False,
            True,
            lambda i: "shared-SAE codes, f(a_rlhf) - f(a_base) (the paper's)",
        ),
        SpaceSpec(
            "sae_pre",
            "pre",
            "shared",
            False,
            True,
            lambda i: "shared-SAE encoder pre-activations, rlhf - base",
        ),
        SpaceSpec(
            "sae_codes_error",
            "codes+error",
            "shared",
            False,
            True,
            lambda i: "shared-SAE codes and reconstruction error, rlhf - base",
        ),
        SpaceSpec(
            "base_sae_codes",
            "codes",
            "base",
            False,
            True,
            lambda i: "codes of an SAE trained on the base model only, rlhf - base",
        ),
        SpaceSpec(
            "topk_wide_codes",
            "codes",
            "wide_topk",
            False,
            True,
            lambda i: (
                f"shared {_arch(i.dictionaries['wide_topk'][0][0])} SAE "
                f"(k={i.dictionaries['wide_topk'][0][0].cfg.k}) codes, rlhf - base"
            ),
        ),
        SpaceSpec(
            "multi_layer_pre",
            "pre",
            "shared",
            True,
            True,
            lambda i: f"shared-SAE pre-activations of layers {_layers_text(i)}, concatenated",
        ),
        # comparisons, not candidates for the main IRM (its controls and validation arms are
        # built for SAEs): the crosscoder's latents, all of them and the RLHF-only ones
        SpaceSpec(
            "crosscoder_codes",
            "crosscoder",
            "crosscoder",
            False,
            False,
            lambda i: (
                f"{_crosscoder_text(i, 'crosscoder')} codes minus its codes with the RLHF "
                "slot given the base activation"
            ),
        ),
        SpaceSpec(
            "crosscoder_rlhf_only",
            "crosscoder",
            "crosscoder_rlhf_only",
            False,
            False,
            lambda i: (
                f"{_crosscoder_text(i, 'crosscoder_rlhf_only')}: the same change on its "
                f"{i.dictionaries['crosscoder_rlhf_only'][0][0].cfg.d_sae} RLHF-only latents"
            ),
        ),
        SpaceSpec(
            "raw_difference",
            "codes",
            "raw",
            False,
            False,
            lambda i: f"raw {_kind_text(i)} activation difference, layer {i.layer}",
        ),
        SpaceSpec(
            "raw_difference_layers",
            "codes",
            "raw",
            True,
            False,
            lambda i: (
                f"raw {_kind_text(i)} activation differences of layers {_layers_text(i)}, "
                "concatenated"
            ),
        ),
    )
}


def _kind_text(i: SpaceInputs) -> str:
    return {"resid_post": "residual", "mlp_out": "MLP-output"}.get(i.kind, i.kind)


def _crosscoder_text(i: SpaceInputs, role: str) -> str:
    cc = i.dictionaries[role][0][0].crosscoder
    return f"{cc.architecture} crosscoder ({cc.n_models} models, width {cc.width})"


def _arch(sae) -> str:
    """``TopK`` or ``BatchTopK`` (sae-lens's architecture name of a saved dictionary)."""
    arch = sae.cfg.architecture() if callable(getattr(sae.cfg, "architecture", None)) else "topk"
    return {"topk": "TopK", "batchtopk": "BatchTopK"}.get(arch, arch)


# the spaces the main IRM can be fitted in (``irm.space``; "auto" picks the best CV R^2)
IRM_SPACES = tuple(name for name, spec in SPACES.items() if spec.selectable)


def register_space(spec: SpaceSpec) -> SpaceSpec:
    """Add (or replace) a feature space. A candidate for the main IRM (``selectable``) must read
    a basis kind with a random stand-in (``BasisKind.random_stand_in``): its random-dictionary
    control, the sparse IRM's control and the validation's random set are built from it."""
    kind = BASES.get(spec.dictionary)
    if kind is None:
        raise ValueError(f"space {spec.name!r} reads basis kind {spec.dictionary!r}: register it")
    if spec.selectable and kind.random_stand_in is None:
        raise ValueError(
            f"space {spec.name!r} is a candidate for the main IRM, but basis kind {kind.name!r} "
            "has no random stand-in for the random-dictionary control: give the kind "
            "random_stand_in, or register the space with selectable=False (a comparison)"
        )
    SPACES[spec.name] = spec
    return spec


@dataclass(frozen=True)
class RegisteredSpace(Rule):
    """``irm.space``: ``auto`` or a candidate space of the registry as it is when the config is
    read (a space registered after import included)."""

    def problem(self, value: Any) -> str | None:
        names = ["auto"] + [n for n, spec in SPACES.items() if spec.selectable]
        if value in names:
            return None
        return f"must be one of {', '.join(repr(n) for n in names)}"

    def edges(self) -> list[Any]:
        return ["auto"]


def available(inputs: SpaceInputs, selectable: bool) -> list[SpaceSpec]:
    """The registered spaces (candidates, or references) a study with these inputs can build."""
    return [s for s in SPACES.values() if s.selectable == selectable and s.available(inputs)]

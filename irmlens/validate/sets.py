"""The feature sets the validation intervenes on, as a registry of set specs.

A ``SetSpec`` says how a set is built (a function of the study's ``SetInputs`` and the sets built
before it), its role and how it is intervened on:

* ``main``: the set the validation is about (the sparse IRM's features): steered at every scale;
* ``part``: a part of the main set (its sign halves): ablated, shown, not tested;
* ``control``: tested against the main set, ablated and steered at scale 1;
* matched draws (``matched_to`` set): random features of the same dictionary matched to another
  set on firing frequency and removed variance; their mean, prompt by prompt, is the control
  that set is tested against (the draws one by one are not tested: several separate tests would
  find a difference by chance).

Adding a control is one ``register_set`` line; its arms, rows and findings follow from its spec.
Library code: no run folders (the ``validate`` stage builds the ``SetInputs``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

MAIN = "sparse_irm"


@dataclass
class FeatureSet:
    """A set of components of one basis per layer: ``features[layer]`` index ``bases[layer]``.
    ``spec``: the registry entry it came from (its role and how it is intervened on)."""

    name: str
    description: str
    bases: dict[int, object]
    features: dict[int, list[int]]
    dictionary: str  # "trained", "random" or "crosscoder"
    spec: SetSpec
    extra: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(len(f) for f in self.features.values())

    def refs(self) -> list[dict]:
        return [
            {"layer": la, "local_feature": int(j)} for la, fs in self.features.items() for j in fs
        ]


@dataclass(frozen=True)
class SetSpec:
    """One registered feature set (see the module docstring). ``steer``: ``every_scale``,
    ``scale_1`` or ``never``; ``matched_to``: for matched draws, the set they are matched to
    (``seed_offset`` separates their draws from other matched sets'); ``of``: how findings name
    this set when it is tested against its own matched draws."""

    name: str
    build: Callable[[SetInputs, dict[str, list[FeatureSet]]], list[FeatureSet]]
    role: str = "control"
    steer: str = "scale_1"
    matched_to: str | None = None
    seed_offset: int = 0
    of: str = ""

    def planned(self, kind: str, scale: float | None) -> bool:
        """Is a set of this spec intervened on in arm ``kind`` at ``scale``?"""
        if kind == "ablate":
            return True
        return self.steer == "every_scale" or (self.steer == "scale_1" and scale == 1)

    @property
    def tested(self) -> bool:
        """Does the main set's comparison with it enter the findings?"""
        return self.role == "control"

    @property
    def pooled(self) -> str:
        """The name of the matched draws' prompt-by-prompt mean."""
        return f"{self.name}_mean"


SETS: dict[str, SetSpec] = {}


def register_set(spec: SetSpec) -> SetSpec:
    """Add (or replace) a feature set; every validation after this call builds it."""
    SETS[spec.name] = spec
    return spec


class Workbench:
    """What the arms share: the two models, the tokenizer, each studied layer's cached activations
    and, per basis, its code statistics (computed once)."""

    def __init__(self, models: dict, tokenizer, acts: dict[str, dict[int, torch.Tensor]]) -> None:
        self.models, self.tokenizer, self.acts = models, tokenizer, acts
        # (id of a basis, layer) -> its code statistics; ("codes", id, layer) -> variance codes
        self._stats: dict[tuple, object] = {}

    def stats(self, basis, layer: int) -> dict:
        """Mean codes in both models, the RLHF model's firing frequency, and the mean change."""
        from irmlens.validate.measures import code_statistics

        key = (id(basis), layer)
        if key not in self._stats:
            mb, _ = code_statistics(basis, self.acts["base"][layer])
            mr, fr = code_statistics(basis, self.acts["rlhf"][layer])
            self._stats[key] = {"mean_rlhf": mr, "frequency": fr, "mean_change": mr - mb}
        return self._stats[key]

    def variance_sample(self, layer: int, n: int = 8192) -> torch.Tensor:
        """An evenly spaced sample of the RLHF model's activations (for variance shares)."""
        a = self.acts["rlhf"][layer]
        return a[torch.linspace(0, len(a) - 1, min(n, len(a))).long()]

    def variance_codes(self, basis, layer: int) -> torch.Tensor:
        """``basis``'s codes of ``variance_sample(layer)``, encoded once: every set's removed
        variance, and every candidate set of the matching, is measured on them."""
        key = ("codes", id(basis), layer)
        if key not in self._stats:
            x = self.variance_sample(layer).to(basis.W_dec.device, basis.W_dec.dtype)
            with torch.no_grad():
                self._stats[key] = basis.encode(x)
        return self._stats[key]

    def removed_share(self, fs: FeatureSet) -> dict[str, float]:
        """Per layer, the share of the activation variance ablating ``fs`` removes."""
        from irmlens.validate.interventions import removed_variance_share

        return {
            str(la): removed_variance_share(
                fs.bases[la],
                self.variance_sample(la),
                f,
                codes=self.variance_codes(fs.bases[la], la),
            )
            for la, f in fs.features.items()
        }


@dataclass
class SetInputs:
    """What the set builders read: the IRM's result (``irm/metrics.json``), the diff stage's
    label-free ranking at the IRM layer, the studied layers, the dictionaries (``dictionary(label,
    layer)``: the basis a feature reference cites; ``random_dictionary(label, layer, seed)``: the
    IRM's random-SAE control standing in for it), the reward model's word utility, the
    validation config and the workbench."""

    irm: dict
    divergent: list[int]
    layers: list[int]
    irm_layer: int
    dictionary: Callable[[str, int], object]
    random_dictionary: Callable[[str, int, int], object]
    word_utility: Callable[[str], float]
    config: object  # ValidateConfig
    bench: Workbench
    matching: dict = field(default_factory=dict)  # matched-to set -> per-layer matching


def build_sets(inputs: SetInputs) -> list[FeatureSet]:
    """Every registered set, in registry order, empty ones left out (e.g. ``diff.top_n = 0``)."""
    built: dict[str, list[FeatureSet]] = {}
    for spec in SETS.values():
        built[spec.name] = [fs for fs in spec.build(inputs, built) if fs.size]
        if spec.role == "main" and not built[spec.name]:
            return []  # nothing to intervene on (the sparse IRM chose only SAE-error columns)
    return [fs for sets in built.values() for fs in sets]


def sets_json(sets: list[FeatureSet]) -> dict:
    """``validation.json``'s ``feature_sets``: each set's description, dictionary and features."""
    return {
        fs.name: {
            "description": fs.description,
            "dictionary": fs.dictionary,
            "features": fs.refs(),
            **fs.extra,
        }
        for fs in sets
    }


# ------------------------------------------------------------------ builders


def _sparse_groups(inputs: SetInputs) -> tuple[dict, dict, int]:
    """The sparse IRM's features per layer (all, and split by the sign of their weight), their
    dictionaries, and how many SAE-error columns were left out."""
    irm = inputs.irm
    weights = {
        (f["dictionary"], f["layer"], f["local_feature"]): f["weight"] for f in irm["top_features"]
    }
    groups: dict[str, dict[int, list[int]]] = {"all": {}, "positive": {}, "negative": {}}
    bases: dict[int, object] = {}
    skipped = 0
    for ref in irm["sparse"]["feature_refs"]:
        if ref["dictionary"] == "sae_error":
            skipped += 1  # an SAE-error column is no dictionary feature: nothing to ablate
            continue
        la, j = ref["layer"], ref["local_feature"]
        bases[la] = inputs.dictionary(ref["dictionary"], la)
        groups["all"].setdefault(la, []).append(j)
        weight = weights.get((ref["dictionary"], la, j))
        if weight is not None and weight != 0:
            groups["positive" if weight > 0 else "negative"].setdefault(la, []).append(j)
    return groups, bases, skipped


def sparse_irm(inputs: SetInputs, built: dict) -> list[FeatureSet]:
    """The main set: the sparse IRM's features (SAE-error columns left out)."""
    groups, bases, skipped = _sparse_groups(inputs)
    refs = inputs.irm["sparse"]["feature_refs"]
    label = next((r["dictionary"] for r in refs if r["dictionary"] != "sae_error"), "shared")
    description = (
        f"the sparse IRM's {inputs.irm['sparse']['k']} features ({label} dictionary"
        + (f"; {skipped} SAE-error columns left out" if skipped else "")
        + ")"
    )
    spec = SETS[MAIN]
    extra = {"dictionary_label": label}
    return [FeatureSet(MAIN, description, bases, groups["all"], "trained", spec, extra)]


def sign_halves(inputs: SetInputs, built: dict) -> list[FeatureSet]:
    """The sparse IRM's features with positive, and with negative, weight."""
    groups, bases, _ = _sparse_groups(inputs)
    spec = SETS["sparse_irm_signs"]
    return [
        FeatureSet(
            f"{MAIN}_{sign}",
            f"the sparse IRM's features with {sign} weight",
            bases,
            groups[sign],
            "trained",
            spec,
        )
        for sign in ("positive", "negative")
        if groups[sign]
    ]


def matched_draws(name: str) -> Callable[[SetInputs, dict], list[FeatureSet]]:
    """Random sets of the matched-to set's dictionary, matched per layer on firing frequency and
    removed variance (``validate.n_random_draws`` draws); draw ``d`` takes each layer's ``d``-th
    draw. The matching is recorded in ``inputs.matching``."""

    def build(inputs: SetInputs, built: dict) -> list[FeatureSet]:
        from irmlens.validate.measures import matched_random_sets

        spec, v, bench = SETS[name], inputs.config, inputs.bench
        target_sets = built.get(spec.matched_to) or []
        if not target_sets:
            return []
        target = target_sets[0]
        per_layer, matching = {}, {}
        for i, (la, feats) in enumerate(target.features.items()):
            basis = target.bases[la]
            share, draws = matched_random_sets(
                basis,
                bench.variance_sample(la),
                bench.stats(basis, la)["frequency"],
                feats,
                n_draws=v.n_random_draws,
                codes=bench.variance_codes(basis, la),
                seed=v.seed + 100 * i + spec.seed_offset,
            )
            per_layer[la] = draws
            matching[str(la)] = {
                "main_removed_variance_share": share,
                "draws_removed_variance_share": [d.removed_share for d in draws],
            }
        inputs.matching[spec.matched_to] = matching
        return [
            FeatureSet(
                f"{name}_{d}",
                f"random features of the same dictionary matched to {target.name} on firing "
                f"frequency and on the activation variance their ablation removes (draw {d + 1})",
                target.bases,
                {la: per_layer[la][d].features for la in target.features},
                "trained",
                spec,
            )
            for d in range(v.n_random_draws)
        ]

    return build


def random_sae_sparse(inputs: SetInputs, built: dict) -> list[FeatureSet]:
    """The random dictionary's features chosen by the sparse selection (recorded by ``irm``)."""
    refs = inputs.irm["controls"].get("random_sae_sparse", {}).get("feature_refs")
    if not refs:
        return []  # a run whose irm stage predates the record: rerun ``irmlens irm --force``
    bases, feats = {}, {}
    for ref in refs:
        if ref["dictionary"] == "sae_error":
            continue
        la = ref["layer"]
        bases[la] = inputs.random_dictionary(ref["dictionary"], la, ref["random_seed"])
        feats.setdefault(la, []).append(ref["local_feature"])
    return [
        FeatureSet(
            "random_sae_sparse",
            "the random dictionary's features chosen by the same sparse selection",
            bases,
            feats,
            "random",
            SETS["random_sae_sparse"],
        )
    ]


def _main_size(built: dict) -> int:
    return sum(fs.size for fs in built.get(MAIN, []))


def top_divergent(inputs: SetInputs, built: dict) -> list[FeatureSet]:
    """The most divergent shared-SAE features at the IRM layer (the diff stage's ranking)."""
    top, la = inputs.divergent[: _main_size(built)], inputs.irm_layer
    return [
        FeatureSet(
            "top_divergent",
            f"the {len(top)} most divergent shared-SAE features of layer {la} (label-free)",
            {la: inputs.dictionary("shared", la)},
            {la: top},
            "trained",
            SETS["top_divergent"],
        )
    ]


def reward_logit(inputs: SetInputs, built: dict) -> list[FeatureSet]:
    """The shared-SAE features (over the studied layers) whose decoder direction pushes lexicon
    words' logits most by their utility, weighted by their mean code in the RLHF model: which
    features carry the reward causally, not which the ridge picked."""
    from irmlens.validate.measures import decoder_directions, reward_logit_scores, token_utilities

    k, bench = _main_size(built), inputs.bench
    w_u = bench.models["rlhf"].get_output_embeddings().weight.detach().T
    utilities = token_utilities(bench.tokenizer, inputs.word_utility, w_u.shape[1])
    scored = []
    for la in inputs.layers:
        sae = inputs.dictionary("shared", la)
        push = reward_logit_scores(decoder_directions(sae), w_u, utilities)
        push = push.double() * bench.stats(sae, la)["mean_rlhf"]
        scored += [(float(push[j]), la, j) for j in range(len(push))]
    scored.sort(reverse=True)
    feats: dict[int, list[int]] = {}
    for _, la, j in scored[:k]:
        feats.setdefault(la, []).append(j)
    return [
        FeatureSet(
            "reward_logit",
            f"the {k} shared-SAE features whose decoder direction most raises rewarded words' "
            "logits over penalised ones (logit lens), times their mean code in the RLHF model",
            {la: inputs.dictionary("shared", la) for la in feats},
            feats,
            "trained",
            SETS["reward_logit"],
            {"top_push": [s for s, _, _ in scored[:k]]},
        )
    ]


for _spec in (
    SetSpec(MAIN, sparse_irm, role="main", steer="every_scale"),
    SetSpec("sparse_irm_signs", sign_halves, role="part", steer="never"),
    SetSpec("matched_random", matched_draws("matched_random"), role="draws", matched_to=MAIN),
    SetSpec("random_sae_sparse", random_sae_sparse),
    SetSpec("top_divergent", top_divergent),
    SetSpec("reward_logit", reward_logit, of="the reward-logit features"),
    SetSpec(
        "reward_logit_matched",
        matched_draws("reward_logit_matched"),
        role="draws",
        steer="never",
        matched_to="reward_logit",
        seed_offset=7,
    ),
):
    register_set(_spec)

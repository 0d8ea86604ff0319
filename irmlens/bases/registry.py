"""The registry of basis kinds a study reads its activations through.

Each ``BasisKind`` says which dictionaries of a study it is (loaded through a ``BasisSource``,
which knows where a study keeps them), under which name feature references cite it, and what a
config must have for it to exist. ``irmlens.irm.spaces`` builds its feature spaces from the kinds
``load_bases`` finds, and the validation loads the dictionaries its feature sets cite the same way.

Adding a kind: write its loader (a function of the source, the layers and the hook kind), then

    register_basis(BasisKind("my_kind", "what it is", load_my_kind, label="my_kind"))

and a feature space or a validation set can name it (``SpaceSpec.dictionary``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

# one loaded basis per layer it covers, with the folder it came from (None: not from a folder)
Loaded = list[tuple[object | None, Path | None]]


class BasisSource(Protocol):
    """What a study offers the loaders (``irmlens.stages.context.StudyContext`` is one)."""

    @property
    def wide_topk_label(self) -> str: ...

    @property
    def hook_kind(self) -> str: ...

    @property
    def d_model(self) -> int: ...

    def dictionary(self, label: str, layer: int, kind: str | None = None) -> tuple[object, Path]:
        """The SAE saved under ``label`` at ``layer`` (and hook kind ``kind``), with its folder;
        ``FileNotFoundError`` when the study has none."""
        ...

    def crosscoder_views(self, kind: str | None = None) -> dict[str, Loaded]:
        """The crosscoder's readings of the RLHF change by view (empty: no crosscoder)."""
        ...


class NoDictionaryError(FileNotFoundError):
    """The study has no dictionary saved under that label (a kind it does not train)."""


def _always(cfg) -> str | None:
    return None


def random_sae_like(basis, folder: Path | None, seed: int, d_model: int):
    """A randomly initialised SAE of ``basis``'s width and architecture, in the input whitening
    its folder records (``sae_training.train.random_sae``): the random-dictionary control."""
    from sae_training.train import load_whitening, random_sae

    whitening = load_whitening(folder) if folder is not None else None
    return random_sae(d_model, basis.cfg.d_sae, seed, like=basis, whitening=whitening)


@dataclass(frozen=True)
class BasisKind:
    """One kind of basis. ``load(source, layers, hook_kind)`` returns one basis per layer of
    ``layers`` (or None when the study has none); ``all_layers``: it is read at every studied
    layer (else at the IRM layer only); ``label``: its name in feature references (a string, or a
    function of the source for a name the config decides); ``unmet(cfg)``: why a config cannot
    have it (None: it can); ``short``: what the report's tables call it; ``random_stand_in(basis,
    folder, seed, d_model)``: a random basis of the same kind and size, for the controls (None:
    the kind has none, so a space over it can only be a comparison, not the main IRM)."""

    name: str
    description: str
    load: Callable[[BasisSource, Sequence[int], str], Loaded | None]
    label: str | Callable[[BasisSource], str]
    all_layers: bool = False
    unmet: Callable[[object], str | None] = _always
    short: str = ""
    random_stand_in: Callable[[object, Path | None, int, int], object] | None = None

    @property
    def report_name(self) -> str:
        return self.short or self.name

    def label_in(self, source: BasisSource) -> str:
        return self.label if isinstance(self.label, str) else self.label(source)


BASES: dict[str, BasisKind] = {}


def register_basis(kind: BasisKind) -> BasisKind:
    """Add (or replace) a basis kind; every study after this call reads it."""
    BASES[kind.name] = kind
    return kind


def cited_basis(source: BasisSource, label: str, layer: int, seed: int | None = None):
    """The basis a feature reference cites by ``label`` at ``layer`` (with ``seed``: its kind's
    random stand-in, as the controls built it): the first registered kind with that label, or
    (a dictionary no kind reads, e.g. the RLHF model's own SAE) the study's dictionary saved
    under it, whose stand-in is a random SAE."""
    for kind in BASES.values():
        if kind.label_in(source) == label:
            loaded = kind.load(source, [layer], source.hook_kind)
            if loaded:
                basis, folder = loaded[0]
                if seed is None:
                    return basis
                if kind.random_stand_in is None:
                    raise ValueError(f"basis kind {kind.name!r} has no random stand-in")
                return kind.random_stand_in(basis, folder, seed, source.d_model)
    basis, folder = source.dictionary(label, layer)
    return basis if seed is None else random_sae_like(basis, folder, seed, source.d_model)


def load_bases(
    source: BasisSource, layers: Sequence[int], irm_layer: int, hook_kind: str
) -> tuple[dict[str, Loaded], dict[str, str]]:
    """Every registered basis the study has, by kind: one per layer it covers (all of
    ``layers`` or the IRM layer), and each kind's label in feature references."""
    found, labels = {}, {}
    for kind in BASES.values():
        loaded = kind.load(source, list(layers) if kind.all_layers else [irm_layer], hook_kind)
        if loaded:
            found[kind.name], labels[kind.name] = loaded, kind.label_in(source)
    return found, labels


# ------------------------------------------------------------------ the study's kinds


def _saved(label: str | Callable[[BasisSource], str], required: bool = True):
    """A loader of the SAEs saved under ``label`` (``required``: a missing one is an error)."""

    def load(source: BasisSource, layers: Sequence[int], kind: str) -> Loaded | None:
        name = label if isinstance(label, str) else label(source)
        try:
            return [source.dictionary(name, la, kind) for la in layers]
        except NoDictionaryError:
            if required:
                raise
            return None

    return load


def _raw(source: BasisSource, layers: Sequence[int], kind: str) -> Loaded:
    return [(None, None)] * len(layers)  # the activations themselves


def _crosscoder_view(view: str):
    def load(source: BasisSource, layers: Sequence[int], kind: str) -> Loaded | None:
        if kind != source.hook_kind:  # the crosscoder is trained on the studied kind only
            return None
        return source.crosscoder_views(kind).get(view)

    return load


def _needs_k(table: str, what: str, example: int):
    """The ``unmet`` of a dictionary that exists only when ``sae.<table>.k`` is not 0."""

    def unmet(cfg) -> str | None:
        if getattr(cfg.sae, table).k == 0:
            return (
                f"needs {what}, but sae.{table}.k = 0 (none): set sae.{table}.k >= 1 "
                f"(e.g. {example})"
            )
        return None

    return unmet


def _difference(source: BasisSource, layers: Sequence[int], kind: str) -> Loaded | None:
    """The dictionary trained on RLHF - base differences, read as a basis of the change."""
    from irmlens.bases.linear import DifferenceBasis

    loaded = _saved("difference", required=False)(source, layers, kind)
    return None if loaded is None else [(DifferenceBasis(sae), folder) for sae, folder in loaded]


def _random_difference(basis, folder: Path | None, seed: int, d_model: int):
    from irmlens.bases.linear import DifferenceBasis

    return DifferenceBasis(random_sae_like(basis.sae, folder, seed, d_model))


def _crosscoder_unmet(cfg) -> str | None:
    if cfg.sae.crosscoder.architecture == "none":
        return 'needs the crosscoder, but sae.crosscoder.architecture = "none": set it to batchtopk or l1'
    return None


for _kind in (
    BasisKind(
        "shared",
        "the SAE trained on both models' activations (or the sae.source dictionary)",
        _saved("shared"),
        "shared",
        all_layers=True,
        short="shared SAE",
        random_stand_in=random_sae_like,
    ),
    BasisKind(
        "base",
        "the SAE trained on the base model's activations only",
        _saved("base"),
        "base",
        short="paired SAE (the base model's)",
        random_stand_in=random_sae_like,
    ),
    BasisKind(
        "wide_topk",
        "the wide TopK (or BatchTopK) SAE trained on both models' activations",
        _saved(lambda s: s.wide_topk_label, required=False),
        lambda s: s.wide_topk_label,
        unmet=_needs_k("wide_topk", "the wide TopK dictionary", 64),
        short="shared wide TopK SAE",
        random_stand_in=random_sae_like,
    ),
    BasisKind(
        "difference",
        "the SAE trained on the RLHF - base activation differences (a basis of the change)",
        _difference,
        "difference",
        all_layers=True,
        unmet=_needs_k("difference", "the difference dictionary", 32),
        short="difference SAE",
        random_stand_in=_random_difference,
    ),
    BasisKind(
        "crosscoder",
        "the crosscoder over every cached model: its change with the RLHF slot given the base's",
        _crosscoder_view("crosscoder"),
        "crosscoder",
        unmet=_crosscoder_unmet,
        short="crosscoder",
    ),
    BasisKind(
        "crosscoder_rlhf_only",
        "the crosscoder's RLHF-only latents (relative decoder norm >= 0.9)",
        _crosscoder_view("crosscoder_rlhf_only"),
        "crosscoder",
        unmet=_crosscoder_unmet,
        short="crosscoder",
    ),
    BasisKind(
        "raw",
        "the standard basis: the activations themselves, no dictionary",
        _raw,
        "raw",
        all_layers=True,
        short="none (raw activations)",
    ),
):
    register_basis(_kind)

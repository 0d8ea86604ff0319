"""The IRM stage's result, typed: what ``irm/metrics.json`` holds, field by field, in file order.

The stage builds one ``IRMResult`` and writes ``to_json()``; the report copies the fields marked
``reported`` (``REPORTED``) into ``report.json`` ``irm`` instead of keeping its own list of keys.
Rows inside (spaces, references, controls, the sparse IRM, word tables) stay plain dicts: their
keys are the schema in ``docs/report-schema.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields


def _reported(**kw):
    """A field ``report.json`` ``irm`` carries."""
    return field(metadata={"reported": True}, **kw)


@dataclass
class IRMResult:
    layer: int = _reported()  # the IRM layer (most changed studied layer)
    layers: list[int] = _reported()  # every studied layer (multi-layer spaces concatenate them)
    hook: str = _reported()  # the IRM layer's hook of the studied kind
    space: str = _reported()  # the main IRM's feature space
    space_selection: str = _reported()  # how it was chosen
    sae: dict = _reported()  # {model, width}: the dictionary the main space reads
    features: str = _reported()  # the main space's description
    n_features: int = 0  # columns of the main space
    n_dictionary_features: int = 0  # of which dictionary features
    n_fit_words: int = _reported(default=0)
    n_heldout_words: int = _reported(default=0)
    n_fit_positions: int = 0
    n_heldout_positions: int = 0
    heldout_kendall_tau: float = _reported(default=float("nan"))
    heldout_kendall_tau_ci: list[float] = _reported(default_factory=list)
    heldout_spearman: float = _reported(default=float("nan"))
    heldout_spearman_ci: list[float] = _reported(default_factory=list)
    reference: dict = _reported(default_factory=dict)  # irmlens.irm.references.REFERENCES
    signal_retention: float | None = _reported(default=None)  # tau / raw-difference tau
    cv_r2: float = _reported(default=float("nan"))
    alpha: float = _reported(default=float("nan"))  # the ridge's alpha
    split_seed: int = _reported(default=0)
    spaces: list[dict] = _reported(default_factory=list)  # every space's row
    sparse: dict = _reported(default_factory=dict)  # the sparse IRM
    crosscoder_sparse: dict | None = None  # the same selection on the crosscoder's change
    heldout_points: list[dict] = _reported(default_factory=list)  # word, true, irm
    top_features: list[dict] = _reported(default_factory=list)  # the sparse IRM's, weighted
    divergent_words: list[dict] = field(default_factory=list)
    controls: dict = field(default_factory=dict)  # irmlens.irm.controls.CONTROLS
    paper_estimator: dict = field(default_factory=dict)
    hook_kinds: dict = _reported(default_factory=dict)  # per cached hook kind

    def to_json(self) -> dict:
        """``metrics.json``: every field, in declaration order."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


# the fields report.json ``irm`` copies from metrics.json (an older run may lack some)
REPORTED = tuple(f.name for f in fields(IRMResult) if f.metadata.get("reported"))

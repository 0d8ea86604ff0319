"""irmlens: what did an RLHF-tuned model learn, and how far is it from its reward model?

Stages (one folder each, data flows one way):
data -> rewards -> models -> rlhf -> cache -> (sae_training) -> diff / irm -> viz -> report;
the glue is `pipeline.py` (the ordered stages) over `stages/`; `study.py` and `explorer.py` read
finished runs.
Heavy libraries are imported inside the stage modules, so ``import irmlens`` stays cheap.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``irmlens.Study`` and ``irmlens.explore`` without importing pandas at ``import irmlens``."""
    if name == "Study":
        from irmlens.study import Study

        return Study
    if name == "explore":
        from irmlens.explorer import explore

        return explore
    raise AttributeError(f"module 'irmlens' has no attribute {name!r}")

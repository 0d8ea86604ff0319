"""SAE training over cached activations, with SAELens's SAE classes, trainer and file format.

It depends on irmlens only for these (``tests/test_layering.py`` holds it to that list):
``irmlens.cache.store`` (reading activation caches), ``irmlens.io`` (atomic writes, checksums),
``irmlens.errors`` (errors the irmlens CLI prints without a traceback), ``irmlens.allocator``
(the process-wide allocator setting its command shares with irmlens's) and ``irmlens.lock`` (the
one-writer lock ``sae-train --out`` takes, as the irmlens commands do). It never imports
irmlens's stages or its later libraries (diff, irm, viz, report).
"""

from sae_training.train import SAETrainingConfig, evaluate_sae, train_sae

__all__ = ["SAETrainingConfig", "evaluate_sae", "train_sae"]

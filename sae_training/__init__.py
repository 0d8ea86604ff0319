"""SAE training over cached activations, with SAELens's SAE classes, trainer and file format.

Reads irmlens caches; never imports irmlens's later stages (diff, irm, viz, report).
"""

from sae_training.train import SAETrainingConfig, evaluate_sae, train_sae

__all__ = ["SAETrainingConfig", "evaluate_sae", "train_sae"]

"""Model diffing: what changed between the base and RLHF models (weights, later features)."""

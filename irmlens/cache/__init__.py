"""Paired activation cache: both models' residual streams on the same held-out tokens."""

"""Models: the embedded tiny LM (pretrained by irmlens), loading pairs as TransformerLens models."""

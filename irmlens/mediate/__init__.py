"""Where RLHF put the reward, measured causally on fixed text (issue 30).

A deterministic metric needs no sampling: the policy's expected next-token utility
``M = mean over positions of sum_v pi(v | ctx) u(v)`` (``metrics``). Patching the RLHF model's
activations at a site with the base model's on the same tokens removes some share of the gain
``M(rlhf) - M(base)`` (and the reverse patch reproduces some): ``sweep`` locates the change by
layer, what is left after the last block being the final norm's and the unembedding's. Within a
layer, ``curves`` ranks a basis's components by attribution patching, re-checks the top ones by
real patches, and patches the top k for real: the faithfulness curve, on which dictionaries,
principal directions, neurons and random bases are compared.

Library code: models, tokens and tensors in; no run folders.
"""

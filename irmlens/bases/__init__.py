"""Bases: every way of reading the activations at one site into components and back.

A *basis* has ``encode(x)`` (``[n, d_model] -> [n, n_components]``), ``decode(codes)`` (back to
``[n, d_model]``), its directions ``W_dec`` (``[n_components, d_model]``) and ``cfg.d_sae`` (its
number of components). That is the protocol SAELens SAEs follow, so a trained SAE *is* a basis;
the crosscoder's readings and sides (``sae_training.crosscoder.CrosscoderReading``,
``irmlens.validate.crosscoder.CrosscoderSide``) follow it too. What a basis does not explain,
``x - decode(encode(x))``, is its error term.

The study's bases are the entries of one registry, ``BASES`` (``irmlens.bases.registry``): the
IRM's feature spaces and the validation's feature sets read their dictionaries only through it,
so a new kind is one module and one ``register_basis`` line.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from irmlens.bases.registry import (
    BASES,
    BasisKind,
    BasisSource,
    load_bases,
    register_basis,
)


@runtime_checkable
class Basis(Protocol):
    """Activations at one site read into components and back (SAELens's SAE interface)."""

    W_dec: torch.Tensor

    def encode(self, x: torch.Tensor) -> torch.Tensor: ...

    def decode(self, codes: torch.Tensor) -> torch.Tensor: ...


def n_components(basis: Basis) -> int:
    """How many components (features, latents, directions) ``basis`` reads."""
    return int(basis.cfg.d_sae)


@torch.no_grad()
def error_term(basis: Basis, x: torch.Tensor) -> torch.Tensor:
    """What ``basis`` does not explain of ``x``: ``x - decode(encode(x))``."""
    return x - basis.decode(basis.encode(x))


__all__ = [
    "BASES",
    "Basis",
    "BasisKind",
    "BasisSource",
    "error_term",
    "load_bases",
    "n_components",
    "register_basis",
]

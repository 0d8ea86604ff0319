"""Bases: every way of reading the activations at one site into components and back.

A *basis* has ``encode(x)`` (``[n, d_model] -> [n, n_components]``), ``decode(codes)`` (back to
``[n, d_model]``), its directions ``W_dec`` (``[n_components, d_model]``) and ``cfg.d_sae`` (its
number of components). That is the protocol SAELens SAEs follow, so a trained SAE *is* a basis; a
crosscoder's side (``irmlens.validate.crosscoder.CrosscoderSide``) follows it too, while its
reading of the change between models (``sae_training.crosscoder.CrosscoderReading``: ``change``
and ``cfg.d_sae``) is what the crosscoder's feature spaces read. What a basis does not explain,
``x - decode(encode(x))``, is its error term.

The study's bases are the entries of one registry, ``BASES`` (``irmlens.bases.registry``): the
IRM's feature spaces load their dictionaries through it (``load_bases``), the validation and the
labels resolve a feature reference's dictionary through it (``cited_basis``), and the controls
build their random stand-ins from it; a new kind is one module and one ``register_basis`` line.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from irmlens.bases.registry import (
    BASES,
    BasisKind,
    BasisSource,
    NoDictionaryError,
    cited_basis,
    load_bases,
    random_sae_like,
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
    "NoDictionaryError",
    "cited_basis",
    "error_term",
    "load_bases",
    "n_components",
    "random_sae_like",
    "register_basis",
]

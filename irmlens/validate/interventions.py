"""Interventions on dictionary features inside an HF causal LM: ablate a set of features in the
residual stream, or steer along their decoded change, at every position of prompt and completion.

The hooks sit on the HF modules themselves (a forward hook on block ``layer``, whose output is
TransformerLens's ``blocks.{layer}.hook_resid_post``, or on its MLP, whose output is
``blocks.{layer}.hook_mlp_out``), so generation runs through the same ``model.generate`` sampler
as the RLHF stage and its evaluation. They know nothing of run folders.

A feature's decoded contribution is computed as ``decode(f ⊙ mask) - decode(0)``: for the SAEs
irmlens trains (an affine decoder, ``f @ W_dec + b_dec``, with any input normalisation folded in or
undone by ``decode``) this is exactly ``sum_i f_i W_dec[i]`` in the model's own activation space,
and it stays right for a decoder that also undoes a whitening.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch

Edit = Callable[[torch.Tensor], torch.Tensor]  # [batch, pos, d_model] -> same shape


def hf_blocks(model) -> torch.nn.ModuleList:
    """The transformer blocks of an HF causal LM (GPT-2 ``transformer.h``, Llama / Mistral /
    Qwen ``model.layers``, GPT-NeoX ``gpt_neox.layers``)."""
    for path in ("transformer.h", "model.layers", "gpt_neox.layers", "model.decoder.layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise TypeError(
        f"cannot find the transformer blocks of {type(model).__name__}: expected one of "
        "transformer.h, model.layers, gpt_neox.layers"
    )


# the hook kinds an edit can sit at (irmlens.cache.store.HOOK_KINDS): the module of block
# ``layer`` whose output that TransformerLens hook reads (GPT-2, Llama-style and GPT-NeoX blocks
# all call their MLP ``mlp`` and add its output to the residual stream)
SITE_MODULES: dict[str, Callable[[torch.nn.Module], torch.nn.Module]] = {
    "resid_post": lambda block: block,
    "mlp_out": lambda block: block.mlp,
}


def hooked_module(model, layer: int, kind: str = "resid_post") -> torch.nn.Module:
    """The HF module whose output is TransformerLens's ``blocks.{layer}.hook_{kind}``."""
    if kind not in SITE_MODULES:
        raise ValueError(f"no intervention site for hook kind {kind!r}: use {sorted(SITE_MODULES)}")
    block = hf_blocks(model)[layer]
    if kind == "mlp_out" and hasattr(block, "post_feedforward_layernorm"):
        # Gemma 2/3, OLMo 2: TransformerLens's hook_mlp_out is after that norm, block.mlp's
        # output before it, so an edit there would not act on the features' activations
        raise ValueError(
            f"{type(block).__name__} normalises its MLP's output (post_feedforward_layernorm): "
            "irmlens cannot yet edit hook_mlp_out there; study resid_post "
            '(cache.hook_kinds = ["resid_post"])'
        )
    return SITE_MODULES[kind](block)


@contextlib.contextmanager
def edit_block_output(model, layer: int, edit: Edit, kind: str = "resid_post") -> Iterator[None]:
    """Within the block, replace the output ``h`` of block ``layer`` (``kind`` "resid_post") or
    of its MLP ("mlp_out") by ``edit(h)`` on every forward pass (prompt and every generated
    token)."""

    def hook(_module, _inputs, output):
        if isinstance(output, tuple):
            return (edit(output[0]), *output[1:])
        return edit(output)

    handle = hooked_module(model, layer, kind).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# where an edit sits: a block index (its output, resid_post) or (block index, hook kind)
Site = int | tuple[int, str]
Edits = dict[Site, Edit]  # one feature set may span several layers


@contextlib.contextmanager
def edit_blocks(model, edits: Edits | None) -> Iterator[None]:
    """Every ``site: edit`` of ``edits`` applied at once (none: the model as it is). An edit with
    an ``attach(model)`` context (a crosscoder ablation, which runs its companion models in
    lockstep) is attached first."""
    with contextlib.ExitStack() as stack:
        for site, edit in (edits or {}).items():
            layer, kind = site if isinstance(site, tuple) else (site, "resid_post")
            if hasattr(edit, "attach"):
                stack.enter_context(edit.attach(model))
            stack.enter_context(edit_block_output(model, layer, edit, kind))
        yield


def _mask(sae, features: Sequence[int] | torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(sae.cfg.d_sae, dtype=sae.W_dec.dtype, device=sae.W_dec.device)
    mask[torch.as_tensor(features, dtype=torch.long, device=mask.device)] = 1.0
    return mask


@torch.no_grad()
def decoded_contribution(sae, codes: torch.Tensor, features) -> torch.Tensor:
    """``sum_{i in features} codes_i W_dec[i]`` in activation space (see the module docstring)."""
    masked = codes * _mask(sae, features)
    return sae.decode(masked) - sae.decode(torch.zeros_like(masked))


def ablation(sae, features) -> Edit:
    """Subtract the features' decoded contributions, with the codes the SAE gives the activation
    itself: ``h - sum_{i in S} f_i(h) W_dec[i]``."""

    @torch.no_grad()
    def edit(h: torch.Tensor) -> torch.Tensor:
        x = h.to(sae.W_dec.device, sae.W_dec.dtype)  # the SAE may sit on another device
        codes = sae.encode(x)
        return (x - decoded_contribution(sae, codes, features)).to(h.device, h.dtype)

    return edit


def steering_vector(sae, mean_code_change: torch.Tensor, features) -> torch.Tensor:
    """The decoded mean RLHF-minus-base change of the features: ``sum_{i in S} mean(Δf_i) W_dec[i]``."""
    return decoded_contribution(sae, mean_code_change.to(sae.W_dec.dtype)[None], features)[0]


def steering(vector: torch.Tensor, scale: float) -> Edit:
    """Add ``scale * vector`` at every position."""

    def edit(h: torch.Tensor) -> torch.Tensor:
        return h + (scale * vector).to(device=h.device, dtype=h.dtype)

    return edit


@torch.no_grad()
def removed_variance_share(
    sae, acts: torch.Tensor, features, batch_size: int = 8192, codes: torch.Tensor | None = None
) -> float:
    """Share of the activations' variance (around their mean) that ablating ``features`` removes:
    ``sum ||contribution||^2 / sum ||a - mean||^2``. Random control sets are matched on it, since
    removing any large trained decoder direction hurts generation whatever it encodes. ``codes``:
    ``sae.encode(acts)`` when the caller has it (matching scores many sets on the same acts)."""
    acts = acts.float()
    mean = acts.mean(0)
    removed = total = 0.0
    for i in range(0, len(acts), batch_size):
        x = acts[i : i + batch_size].to(sae.W_dec.device)
        c = sae.encode(x.to(sae.W_dec.dtype)) if codes is None else codes[i : i + batch_size]
        c = decoded_contribution(sae, c.to(sae.W_dec.device, sae.W_dec.dtype), features).float()
        removed += float((c**2).sum())
        total += float(((x - mean.to(x.device)) ** 2).sum())
    return removed / total if total > 0 else 0.0

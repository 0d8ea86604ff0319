"""Interventions on crosscoder latents inside an HF causal LM (the validation of crosscoder
latents): ablate latents in one model, or steer a model along their decoded difference.

A crosscoder's encoder reads every model's activation at the same tokens, so a latent's code in
the RLHF model at a position is only defined with the base's (and the null model's) activation
there. Ablation therefore runs the other models **in lockstep**: on every forward pass of the
intervened model (the prompt, then each generated token), a hook runs each companion model on
the same tokens up to the crosscoder's layer, with its own KV cache, and the edit encodes the
stacked activations (companions' and the intervened model's own) and subtracts the chosen
latents' contributions to the intervened model's slot: ``h - sum_{j in S} f_j(x) d_j^m``.
Steering needs no codes: it adds ``sum_{j in S} mean(f_j) (d_j^tuned - d_j^base)``, the part of
the crosscoder's reconstruction that tells the tuned model from the base through those latents.

The sides below have the shape the SAE helpers of ``irmlens.validate.interventions`` take (``cfg.d_sae``,
``W_dec``, ``decode``), so decoded contributions, removed-variance shares and matched random
sets are computed by the same code as for SAE features. Library code: no run folders.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from types import SimpleNamespace

import torch

from irmlens.validate.interventions import decoded_contribution, hooked_module


class _Stop(Exception):
    """Raised by a companion's capture hook: the rest of its forward pass is not needed."""


class CrosscoderSide:
    """Model ``model``'s decoder of crosscoder ``cc`` (``models`` in its slot order), shaped like
    an SAE: ``decode(f)`` is that model's reconstruction in its raw activation space. Codes are
    not a function of one model's activation: ``paired_codes`` gives them."""

    def __init__(self, cc, models: Sequence[str], model: str) -> None:
        self.crosscoder, self.models, self.model = cc, list(models), model
        self.slot = self.models.index(model)
        self.cfg = SimpleNamespace(d_sae=cc.width)
        self.W_dec = (cc.W_dec[self.slot] / cc.input_scale[self.slot]).detach()

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        flat = self.crosscoder.decode(f.reshape(-1, f.shape[-1]))
        return flat[:, self.slot].view(*f.shape[:-1], self.crosscoder.d_in)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise TypeError(
            "a crosscoder's codes read every model's activation at once: use paired_codes"
        )


class CrosscoderDifference(CrosscoderSide):
    """The tuned-minus-base difference of crosscoder ``cc``'s reconstructions, shaped like an SAE:
    ``decode(e_j) - decode(0) = d_j^tuned - d_j^base`` (raw spaces). Its decoded mean codes are
    the steering vector of a latent set."""

    def __init__(self, cc, models: Sequence[str], tuned: str, base: str = "base") -> None:
        super().__init__(cc, models, tuned)
        self.base_slot = self.models.index(base)
        base_dec = cc.W_dec[self.base_slot] / cc.input_scale[self.base_slot]
        self.W_dec = (self.W_dec - base_dec).detach()

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        flat = self.crosscoder.decode(f.reshape(-1, f.shape[-1]))
        out = flat[:, self.slot] - flat[:, self.base_slot]
        return out.view(*f.shape[:-1], self.crosscoder.d_in)


@torch.no_grad()
def paired_codes(cc, acts: dict[str, torch.Tensor], models: Sequence[str], batch_size: int = 8192):
    """``[n, width]``: the crosscoder's codes of aligned per-model activations ``acts``."""
    from sae_training.crosscoder import stack_models

    x_all = stack_models({m: acts[m] for m in models})
    out = [
        cc.encode(x_all[i : i + batch_size].to(cc.W_enc.device)).cpu()
        for i in range(0, len(x_all), batch_size)
    ]
    return torch.cat(out) if out else torch.zeros(0, cc.width)


@torch.no_grad()
def paired_code_statistics(
    cc, acts: dict[str, torch.Tensor], models: Sequence[str], batch_size: int = 8192
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per latent: mean code and firing frequency over aligned per-model activations ``acts``,
    in batches (the codes of a whole cache need not fit in memory)."""
    n = len(acts[models[0]])
    total = torch.zeros(cc.width, dtype=torch.float64)
    fired = torch.zeros(cc.width, dtype=torch.float64)
    for i in range(0, n, batch_size):
        codes = paired_codes(cc, {m: acts[m][i : i + batch_size].float() for m in models}, models)
        total += codes.double().sum(0)
        fired += (codes > 0).double().sum(0)
    return total / max(n, 1), fired / max(n, 1)


def _cache_argument(model) -> str:
    """The name ``model.forward`` takes its KV cache by: transformers 5 calls it ``cache``
    (``past_key_values`` is deprecated there), earlier versions ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _capture(model, ids, mask, positions, layer: int, kind: str, cache, cache_arg: str):
    """``model``'s activation at ``(layer, kind)`` for ``ids`` (after ``cache``'s tokens, passed
    as ``cache_arg``), its forward stopped right there."""
    box = {}

    def hook(_module, _inputs, output):
        box["h"] = output[0] if isinstance(output, tuple) else output
        raise _Stop

    handle = hooked_module(model, layer, kind).register_forward_hook(hook)
    try:
        model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
            **{cache_arg: cache},
        )  # fmt: skip
    except _Stop:
        pass
    finally:
        handle.remove()
    return box["h"]


class CrosscoderAblation:
    """An edit (``h -> h'``) that removes latents ``features`` of the crosscoder from model
    ``side.model``'s activation, with codes read from every model in lockstep. ``attach(model)``
    installs the companions' runs on the intervened model (``edit_blocks`` does it)."""

    def __init__(
        self,
        side: CrosscoderSide,
        companions: dict,
        layer: int,
        kind: str,
        features: Sequence[int],
    ) -> None:
        cc = side.crosscoder
        if cc.architecture == "batchtopk" and float(cc.threshold) < 0:
            raise ValueError(
                "the crosscoder's BatchTopK threshold is not calibrated: its codes would depend "
                "on the batch (calibrate_threshold, which train_crosscoder runs)"
            )
        missing = [m for m in side.models if m != side.model and m not in companions]
        if missing:
            raise ValueError(f"crosscoder ablation needs the models {missing} as companions")
        self.side, self.companions, self.layer, self.kind = side, companions, layer, kind
        self.features = [int(j) for j in features]
        self._acts: dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def attach(self, model) -> Iterator[None]:
        caches: dict = {}
        cache_args = {name: _cache_argument(m) for name, m in self.companions.items()}

        def before_forward(_module, args, kwargs):
            from transformers import DynamicCache

            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                raise TypeError("a crosscoder ablation needs input_ids (not inputs_embeds)")
            # generate drops an all-ones mask (no padding): None is passed on as it is
            mask = kwargs.get("attention_mask")
            own = kwargs.get("cache")
            own = kwargs.get("past_key_values") if own is None else own
            fresh = own is None or own.get_seq_length() == 0  # a sequence's first pass
            # the intervened model's own positions (None: each model's default, the same for
            # both, from its own cache length)
            positions = kwargs.get("position_ids")
            for name, companion in self.companions.items():
                if fresh or name not in caches:
                    caches[name] = DynamicCache()
                dev = next(companion.parameters()).device
                self._acts[name] = _capture(
                    companion,
                    ids.to(dev),
                    None if mask is None else mask.to(dev),
                    None if positions is None else positions.to(dev),
                    self.layer,
                    self.kind,
                    caches[name],
                    cache_args[name],
                )

        handle = model.register_forward_pre_hook(before_forward, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
            self._acts.clear()

    @torch.no_grad()
    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        cc = self.side.crosscoder
        if not self._acts:
            raise RuntimeError("a crosscoder ablation runs inside edit_blocks (it attaches itself)")
        per_model = {m: self._acts[m] for m in self.side.models if m != self.side.model}
        per_model[self.side.model] = h
        dev, dtype = cc.W_enc.device, cc.W_enc.dtype
        x = torch.stack([per_model[m].to(dev, dtype) for m in self.side.models], dim=-2)
        codes = cc.encode(x.reshape(-1, *x.shape[-2:]))
        removed = decoded_contribution(self.side, codes, self.features)
        return h - removed.view(h.shape).to(h.device, h.dtype)

"""Crosscoders: one latent dictionary read from several models' activations at the same tokens,
with a decoder per model (Anthropic, "Sparse crosscoders", 2024), so latents shared by the models
and latents only one model uses come out by construction.

SAELens has no crosscoder (its pull request is still open) and the science-of-finetuning code is a
fork of dictionary_learning without a command line, so this module is our own. Its formulas follow
that code (``science-of-finetuning/crosscoder_learning``, ``dictionary_learning/dictionary.py`` and
``trainers/crosscoder.py``), on which Minder et al. (arXiv 2504.02922) ran:

- encode ``f = ReLU(sum_m x^m W_enc[m] + b_enc)``; decode ``x^m_hat = sum_j f_j d_j^m + b_dec^m``;
- **BatchTopK** keeps the ``k * batch`` largest entries of ``f_j * sum_m ||d_j^m||`` over the whole
  batch (the kept values are the unscaled ``f_j``) and, at inference, the entries above a
  threshold; loss: the per-model L2 error norm (not squared), averaged over tokens and models, plus
  ``aux_coefficient`` times the normalised auxiliary loss of the dead latents (top ``d // 2`` dead
  latents reconstructing the residual);
- **L1**: loss = the same error term + ``l1_coefficient * mean_tokens sum_j f_j sum_m ||d_j^m||``
  (the decoder norms summed over models, Anthropic's formulation).

Where we differ, and why:
- each model's activations are scaled to mean norm ``sqrt(d)`` (one factor per model, estimated
  from the data and stored in the file, applied by ``encode`` and undone by ``decode``), so every
  decoder norm compares models on the same scale and the hyperparameters carry across models;
- the decoder bias starts at each model's mean, not its geometric median;
- the BatchTopK inference threshold is computed once after training, as the value that gives a
  mean L0 of exactly k over a sample of training positions (the population version of batch
  top-k), instead of the reference code's EMA of per-batch minima, which needs thousands of steps
  to settle and our CPU runs have a few hundred.

Saved as a folder: ``crosscoder.safetensors`` (``W_enc`` [M, d, F], ``b_enc`` [F], ``W_dec``
[M, F, d], ``b_dec`` [M, d], ``input_scale`` [M], ``threshold`` []) and ``cfg.json`` (architecture,
models, hook, sizes); ``training.json`` records the settings, the evals and each file's sha256,
which ``load_crosscoder`` checks. The weights load back bit-identically. Checkpoints (for resume
after a kill) are folders named by steps done, each holding ``state.pt``; under ``torchrun`` the
training is data-parallel and gives the single-process crosscoder (see ``train_crosscoder``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from irmlens.errors import CorruptCacheError
from irmlens.io import sha256_file

CROSSCODER_ARCHITECTURES = ("batchtopk", "l1")
# "auto": the sparse BatchTopK step (sae_training.sparse: decoder and backward through the kept
# entries) where at most SPARSE_MAX_DENSITY of the latents are active, the dense one otherwise
CROSSCODER_TRAINERS = ("auto", "dense", "sparse")
WEIGHTS = "crosscoder.safetensors"
CFG = "cfg.json"
TRAINING = "training.json"
FORMAT = "irmlens-crosscoder-v1"
CHECKPOINT_STATE = "state.pt"  # a checkpoint folder's one file: the whole training state


@dataclass
class CrosscoderConfig:
    width: int = 1024
    architecture: str = "batchtopk"  # one of CROSSCODER_ARCHITECTURES
    k: int = 32  # batchtopk: mean active latents per token
    l1_coefficient: float = 0.041  # l1: mu (the paper's Gemma-2 run used 0.041)
    lr: float = 1e-3
    batch_size: int = 1024
    epochs: float = 2.0
    lr_warm_up_fraction: float = 0.05
    aux_coefficient: float = 1 / 32  # batchtopk: weight of the dead-latent loss
    # a latent is dead after this many tokens without firing (the reference code: 10M; 0: one
    # epoch of the training data, so short runs have dead latents to revive at all)
    dead_after_tokens: int = 0
    # initial norm of every latent's encoder column and decoder row, per model (the reference
    # code: 1.0 for BatchTopK, 0.005 for L1); None: that default for the architecture
    init_norm: float | None = None
    n_checkpoints: int = 0  # checkpoints during training (resume after an interruption)
    seed: int = 0
    device: str = "cpu"
    trainer: str = "auto"  # one of CROSSCODER_TRAINERS; how the step runs, not what it computes

    def __post_init__(self) -> None:
        if self.trainer not in CROSSCODER_TRAINERS:
            raise ValueError(
                f"crosscoder trainer {self.trainer!r}; choose one of {CROSSCODER_TRAINERS}"
            )
        if self.trainer == "sparse" and self.architecture != "batchtopk":
            raise ValueError(
                "crosscoder trainer 'sparse' is the BatchTopK step: use architecture 'batchtopk', "
                "or trainer 'dense'"
            )
        if self.architecture not in CROSSCODER_ARCHITECTURES:
            raise ValueError(
                f"crosscoder architecture {self.architecture!r}; choose one of "
                f"{CROSSCODER_ARCHITECTURES}"
            )
        if self.width <= 0 or self.batch_size <= 0 or self.epochs <= 0 or self.k <= 0:
            raise ValueError("crosscoder width, k, batch_size and epochs must be positive")
        if self.n_checkpoints < 0:
            raise ValueError("crosscoder n_checkpoints must be 0 or more")
        if self.architecture == "batchtopk" and self.k > self.width:
            raise ValueError(f"crosscoder k = {self.k} exceeds its width {self.width}")

    @property
    def sparse_step(self) -> bool:
        """Whether training runs the sparse BatchTopK step (``sae_training.sparse``)."""
        from sae_training.train import sparse_pays

        if self.trainer == "auto":
            return self.architecture == "batchtopk" and sparse_pays(self.k, self.width, self.device)
        return self.trainer == "sparse"

    @property
    def initial_norm(self) -> float:
        if self.init_norm is not None:
            return self.init_norm
        return 1.0 if self.architecture == "batchtopk" else 0.005


class Crosscoder(nn.Module):
    """A crosscoder over ``n_models`` models' ``d_in``-dimensional activations at the same tokens.

    Inputs and outputs are ``[batch, n_models, d_in]`` raw activations; ``input_scale`` maps them
    into the space the dictionary was trained in (and every decoder norm is measured in)."""

    def __init__(
        self, n_models: int, d_in: int, width: int, architecture: str = "batchtopk", k: int = 32
    ) -> None:
        super().__init__()
        if architecture not in CROSSCODER_ARCHITECTURES:
            raise ValueError(f"crosscoder architecture {architecture!r}")
        self.architecture, self.k = architecture, int(k)
        self.n_models, self.d_in, self.width = n_models, d_in, width
        self.W_enc = nn.Parameter(torch.zeros(n_models, d_in, width))
        self.b_enc = nn.Parameter(torch.zeros(width))
        self.W_dec = nn.Parameter(torch.zeros(n_models, width, d_in))
        self.b_dec = nn.Parameter(torch.zeros(n_models, d_in))
        self.register_buffer("input_scale", torch.ones(n_models))
        # batchtopk inference: an entry is active when f_j * sum_m ||d_j^m|| exceeds it; < 0
        # means "not calibrated yet" (encode then takes the batch top-k)
        self.register_buffer("threshold", torch.tensor(-1.0))

    def init_weights(self, init_norm: float, seed: int) -> None:
        """Kaiming-uniform encoder, each latent's column rescaled to ``init_norm`` per model, the
        same matrix for every model, and the decoder its transpose (the reference code's
        ``same_init_for_all_layers`` and ``init_with_transpose``)."""
        gen = torch.Generator().manual_seed(seed)
        bound = math.sqrt(6.0 / self.width)  # kaiming_uniform_ fan_in of a [d, F] matrix
        w = (torch.rand(self.d_in, self.width, generator=gen) * 2 - 1) * bound
        w = w / w.norm(dim=0, keepdim=True) * init_norm
        with torch.no_grad():
            self.W_enc.copy_(w.expand(self.n_models, -1, -1))
            self.W_dec.copy_(w.T.expand(self.n_models, -1, -1))
            self.b_enc.zero_()

    def decoder_norms(self) -> torch.Tensor:
        """``[n_models, width]``: ||d_j^m||, in the scaled space."""
        return self.W_dec.norm(dim=-1)

    def scale_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Raw activations ``[batch, n_models, d_in]`` in the scaled (training) space."""
        return x * self.input_scale.to(x.dtype)[None, :, None]

    def pre_codes_scaled(self, xs: torch.Tensor) -> torch.Tensor:
        """ReLU pre-codes ``[batch, width]`` of scaled activations."""
        return torch.relu(torch.einsum("bmd,mdf->bf", xs, self.W_enc) + self.b_enc)

    def pre_codes(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU pre-codes ``[batch, width]`` of raw activations ``[batch, n_models, d_in]``."""
        return self.pre_codes_scaled(self.scale_inputs(x))

    def select(self, pre: torch.Tensor, use_threshold: bool) -> torch.Tensor:
        """BatchTopK selection of pre-codes (L1: the identity): the batch's ``k * batch`` largest
        decoder-norm-weighted entries, or the entries above the calibrated threshold."""
        if self.architecture == "l1":
            return pre
        scaled = pre * self.decoder_norms().sum(0)
        if use_threshold and float(self.threshold) >= 0:
            return pre * (scaled > self.threshold)
        n_keep = min(self.k * pre.shape[0], pre.numel())
        idx = scaled.flatten().topk(n_keep, sorted=False).indices
        out = torch.zeros_like(pre).flatten()
        out[idx] = pre.flatten()[idx]
        return out.view_as(pre)

    def encode(self, x: torch.Tensor, use_threshold: bool = True) -> torch.Tensor:
        """Latent codes ``[batch, width]`` of raw activations ``[batch, n_models, d_in]``."""
        return self.select(self.pre_codes(x), use_threshold)

    def decode_scaled(self, f: torch.Tensor) -> torch.Tensor:
        """Reconstructions ``[batch, n_models, d_in]`` in the scaled (training) space."""
        return torch.einsum("bf,mfd->bmd", f, self.W_dec) + self.b_dec

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Reconstructions ``[batch, n_models, d_in]`` of raw activations."""
        return self.decode_scaled(f) / self.input_scale.to(f.dtype)[None, :, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    @torch.no_grad()
    def calibrate_threshold(self, x: torch.Tensor, batch_size: int = 4096) -> float:
        """Set the BatchTopK inference threshold to the value above which the decoder-norm-
        weighted pre-codes of ``x`` (raw, ``[n, n_models, d_in]``) have exactly ``k`` entries per
        token on average, and return it."""
        if self.architecture != "batchtopk":
            return float(self.threshold)
        norms = self.decoder_norms().sum(0)
        scaled = torch.cat(
            [
                (self.pre_codes(x[i : i + batch_size]) * norms).flatten()
                for i in range(0, len(x), batch_size)
            ]
        )
        n_keep = min(self.k * len(x), scaled.numel())
        kth = scaled.topk(n_keep, sorted=True).values[-1]
        self.threshold.fill_(max(float(kth) - 1e-12, 0.0))
        return float(self.threshold)


def stack_models(acts: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[n, n_models, d]`` from aligned per-model ``[n, d]`` tensors (the paired cache's
    positions are aligned across models)."""
    shapes = {name: tuple(a.shape) for name, a in acts.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(
            f"crosscoder inputs must be aligned, with one shape for every model: got {shapes}"
        )
    return torch.stack([a.float() for a in acts.values()], dim=1)


def _error_term(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """The per-model L2 error norm (not squared), averaged over tokens and models."""
    return torch.linalg.norm(x - x_hat, dim=-1).mean()


def _aux_loss(
    cc: Crosscoder,
    residual: torch.Tensor,
    pre_dead: torch.Tensor,
    scaled_dead: torch.Tensor,
    dead_idx: torch.Tensor,
    dist=None,
) -> torch.Tensor:
    """BatchTopK's auxiliary loss: the top ``d // 2`` dead latents of each token (ranked by
    decoder-norm-weighted pre-code ``scaled_dead``) reconstruct the detached residual, the
    squared error divided by the residual's variance over the (global, under DDP) batch; 0
    without dead latents. ``pre_dead``: the pre-codes of the dead latents ``dead_idx`` alone
    (their columns: the others would be masked out of the top-k anyway)."""
    n_dead = dead_idx.numel()
    if n_dead == 0:
        return pre_dead.new_zeros(())
    k_aux = min(cc.d_in // 2, n_dead)
    idx = scaled_dead.topk(k_aux, dim=-1).indices
    aux_codes = torch.zeros_like(pre_dead).scatter(-1, idx, pre_dead.gather(-1, idx))
    recon = torch.einsum("bf,mfd->bmd", aux_codes, cc.W_dec[:, dead_idx]).flatten(1)
    r = residual.flatten(1)
    err = (r - recon).pow(2).sum(-1).mean()
    if dist is None:
        denom = (r - r.mean(0)).pow(2).sum(-1).mean()
    else:  # the global batch's variance, in two passes like the line above (a constant)
        n = torch.tensor(float(len(r)), device=r.device)
        total = r.sum(0)
        dist.all_reduce(n)
        dist.all_reduce(total)
        denom = (r - total / n).pow(2).sum()
        dist.all_reduce(denom)
        denom = denom / n
    return (err / denom).nan_to_num(0.0)


def _global_cut(scaled: torch.Tensor, n_keep: int, dist, world: int) -> torch.Tensor:
    """BatchTopK's cut over the global batch under DDP: each process's ``n_keep`` (= ``k *
    global batch``) largest entries are gathered and the cut is the ``n_keep``-th of them, so
    every process keeps exactly the entries one process would keep on the whole batch (ties
    aside)."""
    flat = scaled.flatten()
    candidates = flat.topk(min(n_keep, flat.numel()), sorted=False).values
    gathered = [torch.empty_like(candidates) for _ in range(world)]
    dist.all_gather(gathered, candidates)
    every = torch.cat(gathered)
    return every.topk(min(n_keep, every.numel()), sorted=False).values.min()


def _dense_step(cc: Crosscoder, xs: torch.Tensor, dist, world: int):
    """(codes ``[batch, width]``, reconstruction, pre-codes) of one step, dense."""
    pre = cc.pre_codes_scaled(xs)
    if world > 1 and cc.architecture == "batchtopk":
        scaled = (pre * cc.decoder_norms().sum(0)).detach()
        cut = _global_cut(scaled, cc.k * pre.shape[0] * world, dist, world)
        f = pre * (scaled >= cut)
    else:
        f = cc.select(pre, use_threshold=False)
    return f, cc.decode_scaled(f), pre


def _sparse_step(cc: Crosscoder, xs: torch.Tensor, dist, world: int, backend: str):
    """(kept pattern, kept codes, reconstruction, dense pre-codes without autograd, decoder-norm
    weighted pre-codes) of one BatchTopK step through the kept entries alone
    (``sae_training.sparse``): the same loss and gradients as ``_dense_step``, up to rounding."""
    from sae_training import sparse

    batch, width = xs.shape[0], cc.width
    x_flat = xs.detach().flatten(1)
    w_enc = cc.W_enc.view(-1, width)  # [n_models * d_in, width]: the einsum's contraction
    with torch.no_grad():
        lin = torch.addmm(cc.b_enc, x_flat, w_enc)
        pre = lin.relu()
        scaled = pre * cc.decoder_norms().sum(0)
        n_keep = cc.k * batch * world
        if world > 1:
            flat = (scaled >= _global_cut(scaled, n_keep, dist, world)).view(-1).nonzero()
            flat = flat.flatten()
            rows, cols = torch.div(flat, width, rounding_mode="floor"), flat % width
        else:
            rows, cols = sparse.batch_topk_entries(scaled, n_keep)
        kept = sparse.Pattern.from_entries(rows, cols, batch, width)
        lin_kept = lin.view(-1).index_select(0, rows * width + cols)
    codes = sparse.gather_codes(x_flat, w_enc, cc.b_enc, lin_kept, kept, backend).relu()
    x_hat = torch.stack(
        [sparse.decode_codes(codes, cc.W_dec[m], kept, backend) for m in range(cc.n_models)],
        dim=1,
    )
    return kept, codes, x_hat + cc.b_dec, pre, scaled


def input_scales(x: torch.Tensor) -> torch.Tensor:
    """Per model, the factor that brings its mean activation norm to ``sqrt(d)``."""
    return math.sqrt(x.shape[-1]) / x.norm(dim=-1).mean(0).clamp_min(1e-12)


def _checkpoint_steps(steps: int, n: int) -> list[int]:
    """The steps after which a checkpoint is written: ``n`` evenly spaced, none at the end."""
    return sorted({steps * (i + 1) // (n + 1) for i in range(n)} - {0, steps})


def _latest_checkpoint(ckpt_dir: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint of ``ckpt_dir`` that loads (folder named by steps done, written
    whole, then renamed); one that does not load is named in a warning and passed over."""
    import pickle
    import warnings

    if not ckpt_dir.is_dir():
        return None
    done = sorted((p for p in ckpt_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    for p in reversed(done):
        try:
            return p, torch.load(p / CHECKPOINT_STATE, map_location="cpu", weights_only=True)
        except (OSError, pickle.UnpicklingError, EOFError, RuntimeError) as e:
            warnings.warn(
                f"crosscoder checkpoint {p} cannot be loaded ({type(e).__name__}: "
                f"{str(e)[:200]}): skipped; training resumes from an earlier one, or the start",
                stacklevel=3,
            )
    return None


def _write_checkpoint(ckpt_dir: Path, step: int, state: dict) -> None:
    from irmlens.io import atomic_dir

    with atomic_dir(ckpt_dir / str(step)) as tmp:
        torch.save(state, tmp / CHECKPOINT_STATE)


def train_crosscoder(
    acts: dict[str, torch.Tensor],
    cfg: CrosscoderConfig,
    log_every: int = 0,
    checkpoint_dir: str | Path | None = None,
) -> tuple[Crosscoder, dict]:
    """Train a crosscoder on aligned per-model activations ``{model: [n, d]}`` (the dict's order
    is the decoders' order). Returns it (in eval mode, threshold calibrated) and its training
    log (steps, final loss terms).

    With ``checkpoint_dir`` and ``cfg.n_checkpoints > 0``, the whole training state (weights,
    optimizer, schedule, dead-latent counters) is saved ``n_checkpoints`` times; a rerun with the
    same settings and data resumes from the newest one and ends on the same weights as an
    uninterrupted run (the batches are a function of the seed alone). Under ``torchrun``, each
    process takes its slice of every global batch, gradients are averaged, and the batch top-k,
    dead-latent counts and auxiliary-loss variance are global, so 2 processes train the same
    crosscoder as 1; only rank 0 writes checkpoints."""
    from sae_training.sparse import default_backend
    from sae_training.train import (
        _all_reduce_gradients,
        _check_checkpoint_dir,
        _check_checkpoint_origin,
        _distributed,
        shuffled_batches,
    )

    dist, rank, world = _distributed()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} does not split over {world} processes")
    local = cfg.batch_size // world
    torch.manual_seed(cfg.seed)
    x_all = stack_models(acts).to(cfg.device)
    n, n_models, d = x_all.shape
    if n < cfg.batch_size:
        raise ValueError(
            f"{n} positions are fewer than one batch of {cfg.batch_size}: lower batch_size"
        )
    cc = Crosscoder(n_models, d, cfg.width, cfg.architecture, cfg.k).to(cfg.device)
    cc.init_weights(cfg.initial_norm, cfg.seed)
    with torch.no_grad():
        cc.input_scale.copy_(input_scales(x_all))
        cc.b_dec.copy_(cc.scale_inputs(x_all).mean(0))
    steps = max(1, int(cfg.epochs * (n // cfg.batch_size)))
    warm = max(1, int(cfg.lr_warm_up_fraction * steps))
    opt = torch.optim.Adam(cc.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    dead_after = cfg.dead_after_tokens or n
    since_fired = torch.zeros(cfg.width, dtype=torch.long, device=cfg.device)
    history, start = [], 0
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None and cfg.n_checkpoints else None
    if ckpt is not None:
        _check_checkpoint_dir(ckpt)
        _check_checkpoint_origin(ckpt, cfg, x_all, write=rank == 0)
        found = _latest_checkpoint(ckpt)
        if found is not None:
            state = found[1]
            cc.load_state_dict(state["crosscoder"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            since_fired.copy_(state["since_fired"])
            history, start = state["history"], int(state["step"])
    checkpoint_at = set(_checkpoint_steps(steps, cfg.n_checkpoints)) if ckpt else set()
    if world > 1:
        _all_reduce_gradients(cc, dist, world)
    batches = shuffled_batches(x_all, cfg.batch_size, cfg.seed, skip=start)
    sparse_step = cfg.sparse_step
    backend = default_backend(cfg.device)
    cc.train()
    terms = torch.zeros(3)
    for step in range(start, steps):
        x = next(batches)[rank * local : (rank + 1) * local]
        xs = cc.scale_inputs(x)
        if sparse_step:
            kept, codes, x_hat, pre, scaled = _sparse_step(cc, xs, dist, world, backend)
            fired = torch.zeros(cfg.width, dtype=torch.bool, device=x.device)
            fired[kept.cols[codes.detach() > 0]] = True
        else:
            f, x_hat, pre = _dense_step(cc, xs, dist, world)
            fired = (f > 0).any(0)
        err = _error_term(xs, x_hat)
        if cfg.architecture == "batchtopk":
            if world > 1:
                fired = fired.int()
                dist.all_reduce(fired, op=dist.ReduceOp.MAX)
                fired = fired.bool()
            since_fired = torch.where(fired, 0, since_fired + cfg.batch_size)
            residual = (xs - x_hat).detach()
            dead_idx = (since_fired >= dead_after).nonzero().flatten()
            if sparse_step:  # the dead latents' pre-codes again, with autograd: their columns
                w_dead = cc.W_enc.view(-1, cfg.width)[:, dead_idx]
                pre_dead = torch.relu(xs.detach().flatten(1) @ w_dead + cc.b_enc[dead_idx])
                scaled_dead = scaled.index_select(1, dead_idx)
            else:
                pre_dead = pre[:, dead_idx]
                scaled_dead = (pre_dead * cc.decoder_norms().sum(0)[dead_idx]).detach()
            aux = _aux_loss(cc, residual, pre_dead, scaled_dead, dead_idx, dist)
            loss = err + cfg.aux_coefficient * aux
        else:
            aux = (f * cc.decoder_norms().sum(0)).sum(-1).mean()
            loss = err + cfg.l1_coefficient * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(cc.parameters(), 1.0)
        opt.step()
        sched.step()
        last = step == steps - 1
        if (log_every and step % log_every == 0) or last:
            terms = torch.stack([loss.detach(), err.detach(), aux.detach()])
            if world > 1:  # the global batch's means (on the device: nccl reduces no CPU tensor)
                dist.all_reduce(terms)
                terms /= world
            terms = terms.cpu()
            if log_every:
                history.append({"step": step, "loss": float(terms[0]), "error": float(terms[1])})
        if step + 1 in checkpoint_at and rank == 0:
            _write_checkpoint(
                ckpt,
                step + 1,
                {
                    "crosscoder": cc.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "since_fired": since_fired.cpu(),
                    "history": history,
                    "step": step + 1,
                },
            )
    cc.eval()
    with torch.no_grad():
        sample = x_all[torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))[:65536]]
        cc.calibrate_threshold(sample)
    log = {
        "steps": steps,
        "n_positions": n,
        "resumed_from_step": start,
        "final_loss": float(terms[0]),
        "final_error": float(terms[1]),
        "final_aux": float(terms[2]),
        "history": history,
    }
    return cc, log


def remove_checkpoints(checkpoint_dir: str | Path) -> None:
    """After the crosscoder is saved: remove the checkpoints this run wrote."""
    from sae_training.train import _remove_checkpoints

    _remove_checkpoints(Path(checkpoint_dir))


@torch.no_grad()
def evaluate_crosscoder(
    cc: Crosscoder, acts: dict[str, torch.Tensor], batch_size: int = 4096
) -> dict:
    """Per model: explained variance and MSE of its reconstruction (raw space); over the
    crosscoder: mean L0 (inference codes) and the share of latents that never fire."""
    names = list(acts)
    x = stack_models(acts)
    sse = torch.zeros(len(names), dtype=torch.float64)
    l0 = 0.0
    fired = torch.zeros(cc.width, dtype=torch.bool)
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        f = cc.encode(xb)
        sse += (xb - cc.decode(f)).double().pow(2).sum((0, 2))
        l0 += float((f > 0).sum())
        fired |= (f > 0).any(0)
    var = (x - x.mean(0)).double().pow(2).sum((0, 2))
    return {
        "per_model": {
            name: {
                "explained_variance": float(1 - sse[m] / var[m]),
                "mse": float(sse[m] / (len(x) * cc.d_in)),
            }
            for m, name in enumerate(names)
        },
        "l0": l0 / len(x),
        "dead_fraction": float(1 - fired.float().mean()),
    }


def save_crosscoder(
    cc: Crosscoder,
    out_dir: str | Path,
    models: list[str],
    hook_name: str,
    training: dict | None = None,
) -> Path:
    """Write the crosscoder folder (weights, cfg.json, training.json with sha256s), replacing
    ``out_dir`` whole (written into a temporary sibling, then renamed)."""
    from safetensors.torch import save_file

    from irmlens.io import atomic_dir, atomic_write_json

    if len(models) != cc.n_models:
        raise ValueError(f"{len(models)} model names for a crosscoder over {cc.n_models} models")
    out = Path(out_dir)
    cfg = {
        "format": FORMAT,
        "architecture": cc.architecture,
        "models": list(models),
        "hook_name": hook_name,
        "d_in": cc.d_in,
        "width": cc.width,
        "k": cc.k,
    }
    with atomic_dir(out) as tmp:
        tensors = {k: v.detach().cpu().contiguous() for k, v in cc.state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS))
        atomic_write_json(tmp / CFG, cfg)
        record = dict(training or {})
        record["sha256"] = {WEIGHTS: sha256_file(tmp / WEIGHTS), CFG: sha256_file(tmp / CFG)}
        atomic_write_json(tmp / TRAINING, record)
    return out


def load_crosscoder(path: str | Path, device: str = "cpu") -> tuple[Crosscoder, dict]:
    """A saved crosscoder and its cfg.json, after checking its files against training.json."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_path = path / CFG
    if not cfg_path.exists():
        raise FileNotFoundError(f"{path} is not a crosscoder folder (no {CFG})")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{cfg_path}: format {cfg.get('format')!r}, expected {FORMAT!r}")
    record = json.loads((path / TRAINING).read_text())
    for name, sha in record.get("sha256", {}).items():
        if sha256_file(path / name) != sha:
            raise CorruptCacheError(
                f"{path / name} does not match its sha256 in {path / TRAINING}: retrain it"
            )
    cc = Crosscoder(len(cfg["models"]), cfg["d_in"], cfg["width"], cfg["architecture"], cfg["k"])
    cc.load_state_dict(load_file(str(path / WEIGHTS)))
    return cc.to(device).eval(), cfg


@dataclass(frozen=True)
class _ReadingConfig:
    d_sae: int


class CrosscoderReading:
    """How the IRM reads a crosscoder's change between two models: at each position, the codes
    of the actual activations of every model minus the codes with model ``m``'s slot given the
    base's activation instead (``change``): what the crosscoder reads differently because ``m``
    moved away from the base there, everything else held fixed.

    Why not encode each model's activation alone, copied into every slot? On a planted pair that
    reading misses the planted RLHF-only latent entirely: the base and null slots' encoder
    columns of an RLHF-only latent never saw its direction, so they stay at their random start,
    and the copied input falls under the BatchTopK threshold (tests/sae_training). Zeros in the
    other slots would halve the input, with the same effect. ``latents`` keeps a subset of the
    latents (e.g. the RLHF-only ones), in that order."""

    def __init__(self, cc: Crosscoder, models: list[str], latents: list[int] | None = None) -> None:
        if len(models) != cc.n_models:
            raise ValueError(f"{len(models)} model names for a crosscoder over {cc.n_models}")
        self.crosscoder, self.models = cc, list(models)
        self.latents = None if latents is None else torch.as_tensor(latents, dtype=torch.long)
        self.cfg = _ReadingConfig(cc.width if self.latents is None else len(self.latents))

    def latent_id(self, column: int) -> int:
        """The crosscoder latent of this reading's column ``column``."""
        return column if self.latents is None else int(self.latents[column])

    @torch.no_grad()
    def change(
        self, acts: dict[str, torch.Tensor], model: str, base: str = "base", batch_size: int = 8192
    ) -> torch.Tensor:
        """``[n, d_sae]``: f(x) - f(x with ``model``'s slot holding ``base``'s activation), on
        aligned per-model activations ``acts`` (every model of the crosscoder)."""
        cc = self.crosscoder
        x_all = stack_models({m: acts[m] for m in self.models})
        slot, b = self.models.index(model), self.models.index(base)
        outs = []
        for i in range(0, len(x_all), batch_size):
            x = x_all[i : i + batch_size].to(cc.W_enc.device)
            counterfactual = x.clone()
            counterfactual[:, slot] = x[:, b]
            f = (cc.encode(x) - cc.encode(counterfactual)).cpu()
            outs.append(f if self.latents is None else f[:, self.latents])
        return torch.cat(outs) if outs else torch.zeros(0, self.cfg.d_sae)

"""Train sae-lens SAEs (standard L1, TopK, BatchTopK, JumpReLU) on an in-memory activation tensor.

We use sae-lens's training SAE classes and ``SAETrainer`` (its Adam loop, L1 warm-up, dead-feature
tracking, activation scaling or whitening and its folding, checkpoints) and feed it our own
shuffled batches from the cache: sae-lens's own pipeline wants to run a model, while ours trains on
stored activations of *two* models. For the standard SAE the trainer's step is our hand-derived one
(``sae_training.fused``; the GPU check measured sae-lens's step at 0.12 of the matmul limit).
The saved folder (``cfg.json`` + ``sae_weights.safetensors``) loads with ``sae_lens.SAE.load_from_disk``;
its ``training.json`` records the settings and the sha256 of each file, which ``load_sae`` checks.
``save_sae`` replaces only a folder it wrote (``check_output_dir``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from irmlens.errors import CorruptCacheError, IrmlensError

ARCHITECTURES = ("standard", "topk", "batchtopk", "jumprelu")
# sae-lens's input normalisations that train_sae supports: scale to mean norm sqrt(d_in) (the
# default), PCA whitening (zero mean, identity covariance; arXiv 2511.13981), or none. Both are
# folded into the saved weights, so saved SAEs take raw activations.
NORMALIZATIONS = ("expected_average_only_in", "covariance_whitening", "none")
WHITENING_FILENAME = "whitening.safetensors"
TRAINERS = ("auto", "sae-lens", "fused", "sparse")  # see SAETrainingConfig.trainer
# "auto" takes the sparse TopK/BatchTopK step when at most this fraction of the latents is active
# per token: below it the sparse step is faster on a CPU (measured in sae_training_speed.py)
SPARSE_MAX_DENSITY = 1 / 8


def sparse_pays(k: int, width: int, device: str) -> bool:
    """Whether "auto" trains a TopK/BatchTopK dictionary through the sparse step: on a CPU, at
    most SPARSE_MAX_DENSITY of its latents active. Not on CUDA: its Triton kernels have run only
    in Triton's interpreter so far, and no GPU measurement says where they beat cuBLAS's dense
    step (ask for them with trainer "sparse")."""
    return torch.device(device).type == "cpu" and k <= SPARSE_MAX_DENSITY * width


@dataclass
class SAETrainingConfig:
    width: int = 512  # d_sae
    architecture: str = "standard"  # standard (L1, the paper's) | topk | batchtopk | jumprelu
    l1_coefficient: float = 1.0  # standard: L1 coefficient; jumprelu: L0 coefficient
    k: int = 32  # topk / batchtopk
    lr: float = 3e-4
    batch_size: int = 1024
    epochs: float = 4.0
    l1_warm_up_fraction: float = 0.1
    n_checkpoints: int = 0  # checkpoints during training (resume after an interruption)
    seed: int = 0
    device: str = "cpu"
    autocast: bool = False  # bf16 autocast for the SAE step (GPU)
    # torch.compile the SAE's training forward pass, as sae-lens's own runner does with compile_sae:
    # fuses the elementwise passes that dominate a GPU step (see the GPU check's profile)
    compile: bool = False
    # "auto": our hand-derived standard-SAE step (sae_training/fused.py: 2.9x sae-lens's step on
    # an H200, same loss and optimizer) for the standard architecture, our sparse TopK/BatchTopK
    # step (sae_training/sparse.py) where at most SPARSE_MAX_DENSITY of the latents are active,
    # sae-lens's own otherwise; "sae-lens": always sae-lens's autograd step; "fused": the
    # hand-derived step (standard only); "sparse": the sparse step (topk and batchtopk only)
    trainer: str = "auto"
    normalize: str = "expected_average_only_in"  # one of NORMALIZATIONS

    def __post_init__(self) -> None:
        if self.width <= 0 or self.batch_size <= 0 or self.epochs <= 0:
            raise ValueError("width, batch_size and epochs must be positive")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"SAE architecture {self.architecture!r}; choose one of {ARCHITECTURES}"
            )
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(
                f"SAE input normalisation {self.normalize!r}; choose one of {NORMALIZATIONS}"
            )
        if self.trainer not in TRAINERS:
            raise ValueError(f"trainer {self.trainer!r}; choose one of {TRAINERS}")
        if self.trainer == "fused" and (self.architecture != "standard" or self.compile):
            raise ValueError(
                "trainer 'fused' is the standard (L1) SAE's hand-derived step and is not "
                "compiled: use architecture 'standard' without compile, or trainer 'sae-lens'"
            )
        if self.trainer == "sparse" and (
            self.architecture not in ("topk", "batchtopk") or self.compile
        ):
            raise ValueError(
                "trainer 'sparse' is the TopK and BatchTopK SAEs' sparse step and is not "
                "compiled: use architecture 'topk' or 'batchtopk' without compile, or trainer "
                "'sae-lens'"
            )

    @property
    def step(self) -> str:
        """Which training step runs: ``fused`` (sae_training.fused), ``sparse``
        (sae_training.sparse) or ``sae-lens``."""
        if self.trainer != "auto":
            return self.trainer
        if self.compile:
            return "sae-lens"
        if self.architecture == "standard":
            return "fused"
        if self.architecture in ("topk", "batchtopk") and sparse_pays(
            self.k, self.width, self.device
        ):
            return "sparse"
        return "sae-lens"


def shuffled_batches(
    acts: torch.Tensor, batch_size: int, seed: int, skip: int = 0
) -> Iterator[torch.Tensor]:
    """Endless stream of shuffled batches, reshuffled every epoch, deterministic under ``seed``.

    ``skip`` batches are passed over first (resuming mid-run sees the batches it would have seen).
    """
    gen = torch.Generator().manual_seed(seed)
    n = acts.shape[0]
    per_epoch = n // batch_size
    emitted = 0
    while True:
        perm = torch.randperm(n, generator=gen)
        if emitted + per_epoch <= skip:  # a whole epoch to skip: only its permutation was needed
            emitted += per_epoch
            continue
        # one copy per epoch: a per-batch copy of indices from pageable host memory waits for
        # the GPU's queue, i.e. synchronises every training step
        perm = perm.to(acts.device)
        for i in range(0, per_epoch * batch_size, batch_size):
            if emitted >= skip:
                # index_select, not acts[idx]: the same rows, gathered ~7x faster on a CPU
                # (aten::index goes through TensorIterator; measured 0.06 vs 0.42 ms per batch)
                yield acts.index_select(0, perm[i : i + batch_size])
            emitted += 1


# Per architecture, the arguments of sae-lens's training config that come from ours; the classes
# themselves come from sae-lens's registry. One table for training and for the random control.
ARCHITECTURE_ARGS: dict[str, Callable[[SAETrainingConfig, int], dict]] = {
    "standard": lambda cfg, warm: {"l1_coefficient": cfg.l1_coefficient, "l1_warm_up_steps": warm},
    "topk": lambda cfg, warm: {"k": cfg.k},
    "batchtopk": lambda cfg, warm: {"k": cfg.k},
    "jumprelu": lambda cfg, warm: {
        "l0_coefficient": cfg.l1_coefficient,
        "l0_warm_up_steps": warm,
    },
}


def _training_sae(architecture: str, **kwargs):
    from sae_lens.registry import get_sae_training_class

    sae_class, cfg_class = get_sae_training_class(architecture)
    return sae_class(cfg_class(**kwargs))


def make_training_sae(
    cfg: SAETrainingConfig, d_in: int, steps: int, hook_name: str, model_name: str
):
    """A sae-lens training SAE of the configured architecture."""
    from sae_lens.saes.sae import SAEMetadata

    warm = int(cfg.l1_warm_up_fraction * steps)
    return _training_sae(
        cfg.architecture,
        d_in=d_in,
        d_sae=cfg.width,
        normalize_activations=cfg.normalize,
        device=cfg.device,
        metadata=SAEMetadata(model_name=model_name, hook_name=hook_name, prepend_bos=True),
        **ARCHITECTURE_ARGS[cfg.architecture](cfg, warm),
    )


def random_sae(d_in: int, width: int, seed: int, like=None, whitening=None):
    """A randomly initialised (untrained) sae-lens SAE of the given width: the control that asks
    how much of the IRM any dictionary of that size and kind would give. ``like``: an SAE whose
    architecture (standard, TopK with its k, JumpReLU: what a saved SAE loads as) the random one
    copies; ``whitening``: the input whitening that SAE was trained in (``load_whitening``),
    folded into the random one too, so it is a random dictionary in the same whitened space."""
    torch.manual_seed(seed)
    arch = like.cfg.architecture() if like is not None else "standard"
    extra = {"k": like.cfg.k} if arch in ("topk", "batchtopk") else {}
    sae = _training_sae(arch, d_in=d_in, d_sae=width, normalize_activations="none", **extra)
    if whitening is not None:
        with torch.no_grad():
            sae.fold_activation_whitening(
                mean=whitening["mean"],
                whitening_matrix=whitening["matrix"],
                unwhitening_matrix=whitening["inverse_matrix"],
            )
    return sae.eval()


def _readable_safetensors(path: Path) -> bool:
    """A safetensors file whose header is whole and whose data covers what the header lists."""
    from safetensors import safe_open

    if not path.exists():
        return False
    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
        return True
    except Exception:  # safetensors raises its own error types for truncated or garbled files
        return False


CHECKPOINT_ORIGIN = "origin.json"
_EXECUTION_SETTINGS = ("device", "autocast", "compile", "trainer")


class TrainingInputError(ValueError, IrmlensError):
    """Bad data, settings or output folder given to ``train_sae`` (what ``sae-train`` and the
    irmlens CLI report without a traceback)."""


def _data_fingerprint(acts: torch.Tensor) -> str:
    """sha256 of the activations' shape and of up to 4096 evenly spaced rows: cheap, and any
    other cache or hook changes it."""
    import hashlib

    step = max(1, acts.shape[0] // 4096)
    sample = acts[::step].detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(str(tuple(acts.shape)).encode())
    h.update(sample.numpy().tobytes())
    return h.hexdigest()


def _check_checkpoint_origin(ckpt_dir: Path, cfg: SAETrainingConfig, acts, write: bool) -> None:
    """Checkpoints resume only the run that wrote them: same settings (device aside), same data.
    A rerun with another L1, seed or cache into the same output would otherwise continue the old
    run silently."""
    from irmlens.io import atomic_write_json, read_json

    origin = {
        # settings that change the run; how it executes (device, autocast, compile, which
        # implementation of the step) may change between an interruption and its resume
        "training": {k: v for k, v in asdict(cfg).items() if k not in _EXECUTION_SETTINGS},
        "data": _data_fingerprint(acts),
    }
    path = ckpt_dir / CHECKPOINT_ORIGIN
    if (
        not path.exists()
        and ckpt_dir.exists()
        and any(p.name.isdigit() for p in ckpt_dir.iterdir())
    ):
        raise TrainingInputError(
            f"{ckpt_dir} holds checkpoints with no record of the run that wrote them "
            f"({CHECKPOINT_ORIGIN}; written by irmlens since 2026-11-27): delete that folder to "
            "start over"
        )
    if path.exists():
        recorded = read_json(path)
        if recorded != origin:
            changed = sorted(
                k
                for k in set(recorded["training"]) | set(origin["training"])
                if recorded["training"].get(k) != origin["training"].get(k)
            ) + (["activations"] if recorded["data"] != origin["data"] else [])
            raise TrainingInputError(
                f"{ckpt_dir} holds checkpoints of another run (differs in: {', '.join(changed)}); "
                "delete that folder to start over, or write to another output folder"
            )
    elif write:
        atomic_write_json(path, origin)


def _complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """sae-lens checkpoint folders (named by training samples seen) that were fully written."""
    from sae_lens.constants import (
        ACTIVATION_SCALER_CFG_FILENAME,
        ACTIVATION_WHITENING_FILENAME,
        SAE_WEIGHTS_FILENAME,
        TRAINER_STATE_FILENAME,
    )

    if not ckpt_dir.exists():
        return []

    def complete(p: Path) -> bool:
        files = (TRAINER_STATE_FILENAME, SAE_WEIGHTS_FILENAME, ACTIVATION_SCALER_CFG_FILENAME)
        if not p.name.isdigit() or not all((p / f).exists() for f in files):
            return False
        # sae-lens writes the whitening matrices after the scaler's json: a checkpoint cut
        # between the two would otherwise resume without whitening
        try:
            scaler = json.loads((p / ACTIVATION_SCALER_CFG_FILENAME).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):  # cut mid-write: not complete
            return False
        if not _readable_safetensors(p / SAE_WEIGHTS_FILENAME):
            return False
        # the whitening file is written last and in place: a cut can leave it half-written
        return not scaler.get("has_whitening") or _readable_safetensors(
            p / ACTIVATION_WHITENING_FILENAME
        )

    return sorted((p for p in ckpt_dir.iterdir() if complete(p)), key=lambda p: int(p.name))


def _loadable_checkpoint(p: Path) -> bool:
    """Whether sae-lens can load checkpoint ``p`` (weights and trainer state read in full, the
    state with ``weights_only``); if not, a warning names it and training resumes from the one
    before it (or the start) instead of dying on a raw UnpicklingError or SafetensorError."""
    import pickle
    import warnings

    from sae_lens.constants import SAE_WEIGHTS_FILENAME, TRAINER_STATE_FILENAME
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        load_file(str(p / SAE_WEIGHTS_FILENAME))
        torch.load(p / TRAINER_STATE_FILENAME, map_location="cpu", weights_only=True)
        return True
    except (OSError, SafetensorError, pickle.UnpicklingError, EOFError, RuntimeError) as e:
        warnings.warn(
            f"SAE checkpoint {p} cannot be loaded ({type(e).__name__}: {str(e)[:200]}): skipped; "
            "training resumes from an earlier checkpoint, or from the start",
            stacklevel=3,
        )
        return False


def train_sae(
    acts: torch.Tensor,
    cfg: SAETrainingConfig,
    hook_name: str,
    model_name: str,
    out_dir: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
):
    """Train an SAE on ``acts`` [n, d_in]; save it in SAELens format to ``out_dir`` if given.

    With ``checkpoint_dir`` and ``cfg.n_checkpoints > 0``, sae-lens checkpoints (weights, optimizer,
    schedulers, activation scaler, feature statistics) are written during training, and a re-run
    resumes from the newest complete one, feeding the same batches it would have seen.
    """
    from sae_lens import TrainingSAE
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    if acts.ndim != 2:
        raise TrainingInputError(
            f"activations must be [n_positions, d_in], got {tuple(acts.shape)}"
        )
    if acts.shape[0] < cfg.batch_size:
        raise TrainingInputError(
            f"only {acts.shape[0]} activation rows for batch_size {cfg.batch_size}: "
            "cache more tokens or lower the batch size (sae.batch_size in a study config, "
            "--batch-size for sae-train)"
        )
    if out_dir is not None:  # refused now, not after training
        check_output_dir(out_dir)
    if checkpoint_dir is not None:
        _check_checkpoint_dir(Path(checkpoint_dir))
    dist, rank, world = _distributed()
    if cfg.batch_size % world:
        raise TrainingInputError(
            f"batch_size {cfg.batch_size} must be divisible by the {world} DDP processes"
        )
    local = cfg.batch_size // world
    acts = _on_device_if_it_fits(acts, cfg.device)
    torch.manual_seed(cfg.seed)
    total = int(cfg.epochs * acts.shape[0])
    steps = max(1, total // cfg.batch_size)
    n_norm = min(100, steps)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    uses_checkpoints = ckpt_dir is not None and cfg.n_checkpoints > 0
    if uses_checkpoints:
        _check_checkpoint_origin(ckpt_dir, cfg, acts, write=rank == 0)
    done = _complete_checkpoints(ckpt_dir) if uses_checkpoints else []
    resume = next((p for p in reversed(done) if _loadable_checkpoint(p)), None)
    sae = make_training_sae(cfg, acts.shape[1], steps, hook_name, model_name)
    if resume is not None:
        sae = TrainingSAE.load_from_disk(str(resume), device=cfg.device)
    writes_checkpoints = ckpt_dir is not None and rank == 0
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * local,
        train_batch_size_samples=local,
        lr=cfg.lr,
        lr_end=cfg.lr / 10,
        lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=min(100, steps // 10),
        device=cfg.device,
        dead_feature_window=max(1, steps // 4),
        feature_sampling_window=max(1, steps // 4),
        n_batches_for_norm_estimate=n_norm,
        autocast=cfg.autocast,
        n_checkpoints=cfg.n_checkpoints if writes_checkpoints else 0,
        checkpoint_path=str(ckpt_dir) if writes_checkpoints else None,
        logger=LoggingConfig(log_to_wandb=False),
    )
    skip = n_norm  # the first n_norm global batches set the input scale

    def data():
        """This process's slice of each global batch (all of it without DDP)."""
        for b in shuffled_batches(acts, cfg.batch_size, cfg.seed, skip=skip):
            yield b[rank * local : (rank + 1) * local].to(cfg.device)

    if cfg.compile:
        sae.training_forward_pass = torch.compile(sae.training_forward_pass)
    trainer = _trainer_class(cfg, sae)(cfg=trainer_cfg, sae=sae, data_provider=data())
    if resume is not None:
        trainer.load_trainer_state(resume)
        # sae-lens checkpoints before it counts the step that triggered the checkpoint
        trainer.n_training_steps += 1
        skip = n_norm + trainer.n_training_samples // local
        trainer.data_provider = data()
        trainer.checkpoint_thresholds = [
            t for t in trainer.checkpoint_thresholds if t >= trainer.n_training_samples
        ]
    elif sae.cfg.normalize_activations == "expected_average_only_in":
        # sae-lens's own estimate (sqrt(d_in) / mean norm over n_norm batches), fed the *global*
        # batches so every DDP process, and a single process, uses the same scale
        trainer.activation_scaler.estimate_scaling_factor(
            acts.shape[1], shuffled_batches(acts, cfg.batch_size, cfg.seed), n_norm
        )
    elif sae.cfg.normalize_activations == "covariance_whitening":
        trainer.activation_scaler.estimate_whitening(
            acts.shape[1], shuffled_batches(acts, cfg.batch_size, cfg.seed), n_norm
        )
    # fit() folds the whitening into the weights and forgets it: keep it, to save beside the SAE
    # (a random control dictionary in the same whitened space needs it)
    whitening = trainer.activation_scaler.whitening
    if world > 1:
        # the fused standard step all-reduces its hand-derived gradients itself; the sparse and
        # sae-lens steps run autograd's backward, whose gradients the hooks average
        trainer.distributed = (dist, world)
        if not getattr(trainer, "reduces_own_gradients", False):
            _all_reduce_gradients(sae, dist, world)
    sae = trainer.fit()
    if out_dir is not None and rank == 0:
        extra_files = {}
        if whitening is not None:
            extra_files[WHITENING_FILENAME] = {
                "mean": whitening.mean.cpu().contiguous(),
                "matrix": whitening.matrix.cpu().contiguous(),
                "inverse_matrix": whitening.inverse_matrix.cpu().contiguous(),
            }
        save_sae(
            sae,
            out_dir,
            extra={"training": asdict(cfg), "n_train_positions": acts.shape[0]},
            tensors=extra_files,
        )
        if ckpt_dir is not None:
            _remove_checkpoints(ckpt_dir)
    return sae


def _trainer_class(cfg: SAETrainingConfig, sae):
    """The trainer class of ``cfg.step``. "auto" falls back to sae-lens's for an SAE our steps
    do not implement; "fused" and "sparse" asked for theirs, whose trainer then refuses such an
    SAE with a clear error."""
    from sae_lens.training.sae_trainer import SAETrainer

    from sae_training import fused, sparse

    own = {
        "fused": (fused, fused.fused_trainer_class),
        "sparse": (sparse, sparse.sparse_trainer_class),
    }
    if cfg.step in own:
        module, trainer_class = own[cfg.step]
        if cfg.trainer != "auto" or module.supports(sae):
            return _bar_to_the_end(trainer_class())
    return _bar_to_the_end(SAETrainer)


def _bar_to_the_end(trainer_class):
    """``trainer_class`` whose progress bar ends at 100%: sae-lens moves its bar every 100 steps
    only, so a run of 405 steps stopped at 99% (400 steps' samples)."""

    def _update_pbar(self, step_output, pbar, update_interval: int = 100):
        if (
            self.n_training_steps % update_interval == 0
            or self.n_training_samples >= self.cfg.total_training_samples
        ):
            losses = " | ".join(
                f"{name}: {float(value() if callable(value) else value):.5f}"
                for name, value in step_output.losses.items()
            )
            pbar.set_description(f"{self.n_training_steps}| {losses}")
            pbar.update(self.n_training_samples - pbar.n)

    return type(trainer_class.__name__, (trainer_class,), {"_update_pbar": _update_pbar})


def _on_device_if_it_fits(acts: torch.Tensor, device: str) -> torch.Tensor:
    """On CUDA, keep the whole activation matrix on the GPU when it takes under half the free
    memory: batches are then gathered there, not on the CPU and copied each step (the GPU check
    measured the host-side gather as the bottleneck). Same permutations, so same batches."""
    dev = torch.device(device)
    if dev.type != "cuda" or acts.device == dev:
        return acts
    free, _ = torch.cuda.mem_get_info(dev)
    if acts.numel() * acts.element_size() < free / 2:
        return acts.to(dev)
    return acts


def _distributed():
    """(torch.distributed, rank, world size) under ``torchrun``; (None, 0, 1) otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist, dist.get_rank(), dist.get_world_size()
    return None, 0, 1


def _all_reduce_gradients(sae, dist, world: int) -> None:
    """Data parallelism for sae-lens's trainer: average every gradient over the processes as soon
    as it is accumulated, so each process's optimizer step (and gradient clipping) sees the
    gradient of the global batch. (sae-lens calls ``training_forward_pass``, not ``forward``, so
    torch's DDP wrapper would not see the backward pass; this hook is its few-line equivalent.)"""

    def hook(p: torch.nn.Parameter) -> None:
        dist.all_reduce(p.grad)
        p.grad.div_(world)

    for p in sae.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(hook)


# --- the output folder: never replace what sae-train did not write ------------------------------

TRAINING_RECORD = "training.json"  # written by save_sae beside SAELens's cfg.json and weights
SAE_MARKER = "irmlens sae_training"  # training.json's "written_by": this folder is ours
# files of an SAE folder written before the marker existed (older irmlens), and the file
# irmlens's saes stage adds to every SAE folder it trained
_LEGACY_SAE_FILES = ("cfg.json", "sae_weights.safetensors", TRAINING_RECORD, WHITENING_FILENAME)
_STAGE_FILES = ("metrics.json",)


def _read_training_record(folder: Path) -> dict | None:
    """``training.json`` of ``folder`` as a dict, or None (absent, unreadable, not a dict)."""
    try:
        record = json.loads((folder / TRAINING_RECORD).read_text())
    except (OSError, ValueError):  # ValueError: JSONDecodeError and UnicodeDecodeError
        return None
    return record if isinstance(record, dict) else None


def is_irmlens_sae_dir(folder: str | Path) -> bool:
    """Whether ``folder`` is an SAE folder that irmlens wrote, so replacing it loses nothing else.

    That is a real folder (not a link) holding only regular files, with a ``training.json`` and
    either
      * ``"written_by": "irmlens sae_training"`` in it, every other file being one its ``"sha256"``
        lists or ``metrics.json`` (what the saes stage adds), or
      * no marker (irmlens before the marker): a ``training.json`` with irmlens's
        ``"training"`` settings and ``"n_train_positions"``, ``cfg.json`` and
        ``sae_weights.safetensors``, and nothing but those, ``whitening.safetensors`` and
        ``metrics.json``.
    """
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return False
    record = _read_training_record(folder)
    if record is None:
        return False
    entries = list(folder.iterdir())
    if any(e.is_symlink() or not e.is_file() for e in entries):
        return False
    names = {e.name for e in entries}
    if record.get("written_by") == SAE_MARKER:
        sums = record.get("sha256")
        listed = set(sums) if isinstance(sums, dict) else set()
        return names <= {TRAINING_RECORD, *listed, *_STAGE_FILES}
    legacy = isinstance(record.get("training"), dict) and "n_train_positions" in record
    return (
        legacy
        and {"cfg.json", "sae_weights.safetensors"} <= names
        and names <= {*_LEGACY_SAE_FILES, *_STAGE_FILES}
    )


def _is_activation_cache(folder: Path) -> bool:
    """An irmlens activation cache, complete (its manifest) or being written (its progress)."""
    manifest = folder / "manifest.json"
    if manifest.is_file():
        try:
            fmt = json.loads(manifest.read_text()).get("format", "")
        except (OSError, ValueError, AttributeError):
            fmt = ""
        if isinstance(fmt, str) and fmt.startswith("irmlens-activations"):
            return True
    return (folder / "progress.json").is_file() and (folder / "tokens.safetensors").exists()


def _enclosing_cache(path: Path) -> Path | None:
    """The activation cache folder ``path`` (resolved) is, or lies in; None if none."""
    for folder in (path, *path.parents):
        if _is_activation_cache(folder):
            return folder
    return None


def _refuse_overlap(path: Path, inputs: Iterable[str | Path], label: str) -> None:
    """Refuse ``path`` that is, lies in or contains an input (or the cache an input lies in),
    or lies in any activation cache."""
    target = path.resolve()
    cache = _enclosing_cache(target)
    if cache is not None:
        raise TrainingInputError(
            f"{label} {path} {'is' if cache == target else 'lies in'} the activation cache "
            f"{cache}: choose a folder outside it "
            "(an SAE written there would replace or mix with the cached activations)"
        )
    protected = []
    for p in inputs:
        p = Path(p).resolve()
        protected.append(p)
        cache = _enclosing_cache(p)
        if cache is not None:
            protected.append(cache)
    for p in protected:
        if target == p or target.is_relative_to(p) or p.is_relative_to(target):
            where = "is" if target == p else "lies in" if target.is_relative_to(p) else "contains"
            raise TrainingInputError(
                f"{label} {path} {where} the training input {p}: choose a folder apart from "
                "the activations"
            )


def check_output_dir(
    out_dir: str | Path, inputs: Iterable[str | Path] = (), label: str = "output folder"
) -> None:
    """Raise ``TrainingInputError`` unless ``save_sae`` may write ``out_dir``.

    ``save_sae`` replaces ``out_dir`` as a whole, so it must be absent, an empty folder, or an SAE
    folder irmlens wrote (``is_irmlens_sae_dir``: retraining replaces it). Refused: a file or
    link; a non-empty folder of anything else; a path that is, lies in or contains one of ``inputs`` (files or
    folders of the training data), or the activation cache one of them lies in; a path in any
    irmlens activation cache. ``label`` names the folder in the message (``--out`` for the CLI).
    """
    given = Path(out_dir)
    _refuse_overlap(given, inputs, label)
    if given.is_symlink():
        raise TrainingInputError(
            f"{label} {given} is a symbolic link: give the folder itself, or a new folder"
        )
    # the folder the path names once its parents exist ('new/..' is the folder holding 'new'):
    # what save_sae replaces, since it writes to the resolved path
    out = given.resolve()
    if out.exists() and not out.is_dir():
        raise TrainingInputError(
            f"{label} {out} exists and is not a folder: give a new or empty folder (it would be "
            "replaced by the SAE folder)"
        )
    if out.is_dir() and any(out.iterdir()) and not is_irmlens_sae_dir(out):
        raise TrainingInputError(
            f"{label} {out} is a non-empty folder that is not an SAE folder irmlens wrote: give a "
            "new or empty folder (writing the SAE replaces the whole folder)"
        )


def _check_checkpoint_dir(ckpt_dir: Path, inputs: Iterable[str | Path] = ()) -> None:
    """Checkpoints go into a folder (made if absent) apart from the training data."""
    _refuse_overlap(ckpt_dir, inputs, "checkpoint folder")
    if os.path.lexists(ckpt_dir) and (ckpt_dir.is_symlink() or not ckpt_dir.is_dir()):
        raise TrainingInputError(
            f"checkpoint folder {ckpt_dir} exists and is not a folder: move it away"
        )


def _remove_checkpoints(ckpt_dir: Path) -> None:
    """After the final save: remove the checkpoints this run wrote (the folders sae-lens names
    by samples seen, and our origin record), and the folder if nothing else is in it. A folder
    without our origin record is left alone (it is not ours)."""
    import shutil

    origin = ckpt_dir / CHECKPOINT_ORIGIN
    if ckpt_dir.is_symlink() or not origin.is_file():
        return
    for p in ckpt_dir.iterdir():
        # and the temporary folders a killed checkpoint write left (irmlens.io.atomic_dir's
        # ".<steps>.<random>.tmp")
        ours = p.name.isdigit() or re.fullmatch(r"\.\d+\..+\.(tmp|old)", p.name)
        if ours and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
    origin.unlink(missing_ok=True)
    try:
        ckpt_dir.rmdir()
    except OSError:  # something else is in it: not ours to remove
        pass


def _verify_sae_files(folder: Path, names: Iterable[str] | None = None) -> None:
    """Check the files ``training.json``'s ``"sha256"`` lists (only ``names`` if given);
    raise ``CorruptCacheError`` naming the first that is missing or differs."""
    from irmlens.io import sha256_file

    path = folder / TRAINING_RECORD
    if not path.exists():
        return
    try:
        record = json.loads(path.read_text())
    except ValueError:
        raise CorruptCacheError(
            f"{path} is not readable JSON (damaged on disk?): delete {folder} and train the SAE "
            "again (re-run the saes stage, or sae-train)"
        ) from None
    sums = record.get("sha256") if isinstance(record, dict) else None
    if not isinstance(sums, dict):  # written before the checksums, or not by irmlens
        return
    wanted = None if names is None else set(names)
    for name, digest in sums.items():
        if wanted is not None and name not in wanted:
            continue
        f = folder / name
        if not f.is_file():
            raise CorruptCacheError(
                f"{f} is missing (listed in {path}): delete {folder} and train the SAE again "
                "(re-run the saes stage, or sae-train)"
            )
        if sha256_file(f) != digest:
            raise CorruptCacheError(
                f"{f} does not match its sha256 in {path}: the file changed after training "
                f"(disk fault, partial copy or edit); delete {folder} and train the SAE again "
                "(re-run the saes stage, or sae-train)"
            )


def save_sae(
    sae,
    out_dir: str | Path,
    extra: dict | None = None,
    tensors: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write the inference SAE (SAELens format) atomically, plus ``training.json`` and any extra
    safetensors files (``{file name: tensors}``, e.g. the whitening it was trained in).

    ``training.json`` holds ``extra``, ``"written_by": "irmlens sae_training"`` and ``"sha256"``:
    the sha256 of every other file written (``load_sae`` checks them). ``out_dir`` must pass
    ``check_output_dir`` (absent, empty or an SAE folder irmlens wrote): it is replaced whole.
    """
    from safetensors.torch import save_file

    from irmlens.io import atomic_dir, sha256_file

    check_output_dir(out_dir)
    with atomic_dir(Path(out_dir).resolve()) as tmp:  # the folder check_output_dir checked
        tmp = Path(tmp)
        sae.save_inference_model(str(tmp))
        for name, ts in (tensors or {}).items():
            save_file(ts, str(tmp / name))
        record = {
            **(extra or {}),
            "written_by": SAE_MARKER,
            "sha256": {
                p.name: sha256_file(p)
                for p in sorted(tmp.iterdir())
                if p.is_file() and p.name != TRAINING_RECORD
            },
        }
        (tmp / TRAINING_RECORD).write_text(json.dumps(record, indent=2))
    return Path(out_dir)


def load_whitening(path: str | Path) -> dict[str, torch.Tensor] | None:
    """The whitening (mean, matrix, inverse_matrix) an SAE was trained in, or None.

    Checked against its sha256 in ``training.json`` when recorded (``CorruptCacheError``)."""
    from safetensors.torch import load_file

    f = Path(path) / WHITENING_FILENAME
    if not f.exists():
        return None
    _verify_sae_files(Path(path), [WHITENING_FILENAME])
    return load_file(str(f))


def load_sae(path: str | Path, device: str = "cpu"):
    """The SAE in SAELens folder ``path`` (``sae_lens.SAE.load_from_disk``).

    The files ``training.json`` records a sha256 for (folders ``save_sae`` wrote) are checked
    first: a missing or changed file raises ``irmlens.errors.CorruptCacheError`` naming it and the
    fix. A folder without checksums (irmlens before them, or any SAELens SAE) loads unchecked."""
    from sae_lens import SAE

    _verify_sae_files(Path(path))
    return SAE.load_from_disk(str(path), device=device)


@torch.no_grad()
def encode_batched(
    sae, acts: torch.Tensor, batch_size: int = 8192, pre_activation: bool = False
) -> torch.Tensor:
    """Feature activations ``[n, d_sae]`` (or encoder pre-activations when ``pre_activation``).
    Any basis with ``encode`` and ``W_dec`` (``irmlens.bases.Basis``) is read the same way."""
    outs = []
    for i in range(0, acts.shape[0], batch_size):
        x = acts[i : i + batch_size].to(sae.W_dec.device)
        if pre_activation:
            x_in = x - sae.b_dec * sae.cfg.apply_b_dec_to_input
            outs.append((x_in @ sae.W_enc + sae.b_enc).cpu())
        else:
            outs.append(sae.encode(x).cpu())
    return torch.cat(outs)


@torch.no_grad()
def evaluate_sae(sae, acts: torch.Tensor, batch_size: int = 8192) -> dict:
    """MSE, explained variance (vs. predicting the mean), mean L0 and fraction of never-firing features."""
    sq_err, l0_sum, fired = 0.0, 0.0, torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    mean = acts.mean(0)
    total_var = float(((acts - mean) ** 2).sum())
    for i in range(0, acts.shape[0], batch_size):
        x = acts[i : i + batch_size].to(sae.W_enc.device)
        f = sae.encode(x)
        recon = sae.decode(f)
        sq_err += float(((recon - x) ** 2).sum())
        active = f > 0
        l0_sum += float(active.sum())
        fired |= active.any(0).cpu()
    n = acts.shape[0]
    return {
        "mse": sq_err / (n * acts.shape[1]),
        "explained_variance": 1.0 - sq_err / total_var,
        "l0": l0_sum / n,
        "dead_fraction": float((~fired).float().mean()),
        "n_positions": n,
    }


@dataclass(frozen=True)
class SAEFolderInfo:
    """What a SAELens SAE folder's cfg.json says about where the dictionary reads."""

    path: Path
    hook_name: str
    layer: int
    kind: str  # resid_post | mlp_out | ... (the part after ``hook_``)
    d_in: int
    d_sae: int
    architecture: str


def read_sae_folder(path: str | Path) -> SAEFolderInfo:
    """Read (without loading the weights) the cfg.json of a SAELens SAE folder, in either
    layout SAELens writes (``hook_name`` under ``metadata``, sae-lens 6, or at the top level);
    a folder that is not one raises ValueError naming the file and what is missing."""
    import re

    path = Path(path).expanduser()
    cfg_file = path / "cfg.json"
    if not path.is_dir():
        raise ValueError(f"{path} is not a folder: give the folder SAELens saved the SAE into")
    if not cfg_file.exists():
        raise ValueError(f"{path} has no cfg.json: it is not a SAELens SAE folder")
    cfg = json.loads(cfg_file.read_text())
    hook = (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name")
    missing = [
        k
        for k, v in (("hook_name", hook), ("d_in", cfg.get("d_in")), ("d_sae", cfg.get("d_sae")))
        if v is None
    ]
    if missing:
        raise ValueError(f"{cfg_file} lacks {', '.join(missing)}: it is not a SAELens SAE cfg.json")
    m = re.fullmatch(r"blocks\.(\d+)\.hook_(\w+)", hook)
    if m is None:
        raise ValueError(
            f"{cfg_file}: hook_name {hook!r} is not a block hook (blocks.<layer>.hook_resid_post "
            "or blocks.<layer>.hook_mlp_out): irmlens caches only those"
        )
    if not any((path / f).exists() for f in ("sae_weights.safetensors", "sae_weights.pt")):
        raise ValueError(f"{path} has no sae_weights.safetensors: the SAE's weights are missing")
    return SAEFolderInfo(
        path,
        hook,
        int(m.group(1)),
        m.group(2),
        int(cfg["d_in"]),
        int(cfg["d_sae"]),
        str(cfg.get("architecture", "standard")),
    )

"""Train a standard (L1) SAE with sae-lens on an in-memory activation tensor.

We use sae-lens's ``StandardTrainingSAE`` and ``SAETrainer`` (its Adam loop, L1 warm-up, dead-feature
tracking and activation-norm folding) and feed it our own shuffled batches from the cache: sae-lens's
own pipeline wants to run a model, while ours trains on stored activations of *two* models.
The saved folder (``cfg.json`` + ``sae_weights.safetensors``) loads with ``sae_lens.SAE.load_from_disk``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass
class SAETrainingConfig:
    width: int = 512  # d_sae
    l1_coefficient: float = 1.0
    lr: float = 3e-4
    batch_size: int = 1024
    epochs: float = 4.0
    l1_warm_up_fraction: float = 0.1
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.width <= 0 or self.batch_size <= 0 or self.epochs <= 0:
            raise ValueError("width, batch_size and epochs must be positive")


def shuffled_batches(acts: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless stream of shuffled batches, reshuffled every epoch, deterministic under ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    n = acts.shape[0]
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch_size + 1, batch_size):
            yield acts[perm[i : i + batch_size]]


def train_sae(
    acts: torch.Tensor,
    cfg: SAETrainingConfig,
    hook_name: str,
    model_name: str,
    out_dir: str | Path | None = None,
):
    """Train a standard SAE on ``acts`` [n, d_in]; save it in SAELens format to ``out_dir`` if given."""
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata, TrainCoefficientConfig
    from sae_lens.training.sae_trainer import SAETrainer

    if acts.ndim != 2:
        raise ValueError(f"activations must be [n_positions, d_in], got {tuple(acts.shape)}")
    if acts.shape[0] < cfg.batch_size:
        raise ValueError(
            f"only {acts.shape[0]} activation rows for batch_size {cfg.batch_size}: "
            "cache more tokens or lower sae.batch_size"
        )
    torch.manual_seed(cfg.seed)
    d_in = acts.shape[1]
    total = int(cfg.epochs * acts.shape[0])
    steps = max(1, total // cfg.batch_size)
    sae_cfg = StandardTrainingSAEConfig(
        d_in=d_in,
        d_sae=cfg.width,
        l1_coefficient=cfg.l1_coefficient,
        l1_warm_up_steps=int(cfg.l1_warm_up_fraction * steps),
        normalize_activations="expected_average_only_in",
        device=cfg.device,
        metadata=SAEMetadata(model_name=model_name, hook_name=hook_name, prepend_bos=True),
    )
    sae = StandardTrainingSAE(sae_cfg)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * cfg.batch_size,
        train_batch_size_samples=cfg.batch_size,
        lr=cfg.lr,
        lr_end=cfg.lr / 10,
        lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=min(100, steps // 10),
        device=cfg.device,
        dead_feature_window=max(1, steps // 4),
        feature_sampling_window=max(1, steps // 4),
        n_batches_for_norm_estimate=min(100, steps),
        logger=LoggingConfig(log_to_wandb=False),
    )
    data = (b.to(cfg.device) for b in shuffled_batches(acts, cfg.batch_size, cfg.seed))
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=data)
    sae = trainer.fit()
    _ = TrainCoefficientConfig  # the L1 warm-up above is sae-lens's coefficient schedule
    if out_dir is not None:
        save_sae(sae, out_dir, extra={"training": asdict(cfg), "n_train_positions": acts.shape[0]})
    return sae


def save_sae(sae, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write the inference SAE (SAELens format) atomically, plus ``training.json``."""
    from irmlens.io import atomic_dir

    with atomic_dir(out_dir) as tmp:
        sae.save_inference_model(str(tmp))
        if extra is not None:
            (Path(tmp) / "training.json").write_text(json.dumps(extra, indent=2))
    return Path(out_dir)


def load_sae(path: str | Path, device: str = "cpu"):
    from sae_lens import SAE

    return SAE.load_from_disk(str(path), device=device)


@torch.no_grad()
def encode_batched(
    sae, acts: torch.Tensor, batch_size: int = 8192, pre_activation: bool = False
) -> torch.Tensor:
    """Feature activations ``[n, d_sae]`` (or encoder pre-activations when ``pre_activation``)."""
    outs = []
    for i in range(0, acts.shape[0], batch_size):
        x = acts[i : i + batch_size].to(sae.W_enc.device)
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

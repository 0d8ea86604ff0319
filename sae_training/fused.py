"""A hand-derived training step for the standard (L1) SAE, run inside sae-lens's own trainer.

Why our own step: the GPU check (``experiments/benchmarks/gpu_cache_sae.py``) profiled sae-lens's
step for d_in 576, width 16384, batch 4096 at 0.12 of the bf16 matmul limit. Matmuls were 15% of
GPU time; the rest was autograd's elementwise passes over the [batch, width] matrix in float32
under autocast (casts included), plus ~2.4 ms of host time and one stream synchronisation per step
(``n_forward_passes_since_fired[did_fire] = 0`` is a boolean-mask assignment). The gradients of
this loss are short enough to write by hand, so this step does five matmuls (bf16 on CUDA,
float32 accumulation, the ReLU fused into the first), a few elementwise passes and column sums over
[batch, width], never synchronises, and uses torch's fused Adam on CUDA.

Everything else is sae-lens's: ``FusedStandardTrainer`` subclasses ``SAETrainer`` and replaces only
``_train_step``, so the loss (MSE summed over d_in + l1 * sum_i f_i ||W_dec,i||, sae-lens's
``StandardTrainingSAE``), L1 warm-up, learning-rate schedule, gradient clipping at norm 1, Adam,
activation scaling and its folding, dead-feature statistics, checkpoints and the saved SAE are the
ones sae-lens uses. ``tests/sae_training/test_fused.py`` checks the gradients against autograd
through sae-lens's ``training_forward_pass`` and whole runs against sae-lens's trainer.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

_PARAMETERS = {"W_enc", "b_enc", "W_dec", "b_dec"}


def supports(sae) -> bool:
    """Whether ``sae`` is a sae-lens standard training SAE whose loss this step implements."""
    from sae_lens import StandardTrainingSAE

    return (
        isinstance(sae, StandardTrainingSAE)
        and {n for n, _ in sae.named_parameters()} == _PARAMETERS
        and sae.cfg.lp_norm == 1.0
        # the trainer scales or whitens the batch before the step; the SAE itself sees it as is
        and sae.cfg.normalize_activations
        in ("none", "expected_average_only_in", "covariance_whitening")
        and sae.cfg.reshape_activations == "none"
    )


class StepResult(NamedTuple):
    losses: dict[str, torch.Tensor]  # mse_loss, l1_loss (float32 scalars)
    grads: dict[str, torch.Tensor]  # by parameter name, float32
    reconstruction: torch.Tensor  # x_hat [batch, d_in]
    feature_acts: torch.Tensor  # f [batch, d_sae], compute dtype
    firing_counts: torch.Tensor  # rows in which each feature fired [d_sae], float32


def standard_sae_step(
    sae,
    x: torch.Tensor,
    l1_coefficient: float | torch.Tensor,
    compute_dtype: torch.dtype | None = None,
) -> StepResult:
    """Losses, gradients, reconstruction and feature activations of one standard-SAE step.

    The loss is sae-lens's: ``mean_b sum_d (x_hat - x)^2 + c * mean_b sum_i f_i ||W_dec,i||`` with
    ``f = relu((x - b_dec) @ W_enc + b_enc)`` and ``x_hat = f @ W_dec + b_dec``. Its gradients:
    ``g = 2 (x_hat - x) / B``; ``dW_dec = f^T g + (c / B) (sum_b f) W_dec / ||W_dec||``;
    ``dpre = (g W_dec^T + (c / B) ||W_dec||) * [f > 0]``; ``dW_enc = (x - b_dec)^T dpre``;
    ``db_enc = sum_b dpre``; ``db_dec = sum_b g - db_enc W_enc^T`` (b_dec is subtracted from the
    input too). ``compute_dtype`` (bf16 on a GPU) is the matmul input type; accumulation, losses
    and gradients are float32. ``l1_coefficient`` may be a 0-d tensor (the CUDA graph's input).
    No autograd graph is built and nothing synchronises, so the step can be captured.
    """
    with torch.no_grad():
        W_enc, b_enc, W_dec, b_dec = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec
        dt = compute_dtype or W_enc.dtype
        x = x.to(W_enc.dtype)
        batch = x.shape[0]
        apply_b_dec = bool(sae.cfg.apply_b_dec_to_input)
        x_in = (x - b_dec if apply_b_dec else x).to(dt)
        W_enc_c, W_dec_c = W_enc.to(dt), W_dec.to(dt)
        if x.is_cuda:  # the ReLU as the matmul's epilogue (cuBLASLt): one pass fewer
            f = torch._addmm_activation(b_enc.to(dt), x_in, W_enc_c)
        else:  # the pre-activation is overwritten in place
            f = torch.addmm(b_enc.to(dt), x_in, W_enc_c).relu_()
        x_hat = torch.addmm(b_dec.to(dt), f, W_dec_c).to(x.dtype)
        residual = x_hat - x
        # the ReLU's derivative as 0/1 in the compute dtype (cheaper than a bool mask on a CPU,
        # where summing or multiplying by bools converts them first)
        fired = torch.sign(f)
        f_sum = f.sum(0, dtype=torch.float32)
        firing_counts = fired.sum(0, dtype=torch.float32)
        dec_norm = W_dec.norm(dim=1)
        mse = residual.pow(2).sum() / batch
        l1 = l1_coefficient * (f_sum * dec_norm).sum() / batch
        g = residual.mul_(2.0 / batch)
        g_c = g.to(dt)
        grad_W_dec = (f.T @ g_c).to(W_dec.dtype)
        # a zero decoder row has zero norm: its L1 gradient is 0 (autograd's subgradient), not NaN
        safe_norm = dec_norm.clamp_min(torch.finfo(dec_norm.dtype).tiny)
        grad_W_dec.addcmul_((l1_coefficient / batch) * (f_sum / safe_norm)[:, None], W_dec)
        d_pre = torch.addmm(((l1_coefficient / batch) * dec_norm).to(dt), g_c, W_dec_c.T)
        d_pre.mul_(fired)
        grad_b_enc = d_pre.sum(0, dtype=torch.float32)
        grad_W_enc = (x_in.T @ d_pre).to(W_enc.dtype)
        grad_b_dec = g.sum(0)
        if apply_b_dec:
            # not ``grad_b_enc @ W_enc.T``: MKL's matrix-vector product rounds differently with
            # the buffers' memory alignment, so a resumed run drifted from an uninterrupted one
            grad_b_dec -= (W_enc * grad_b_enc).sum(1)
    losses = {"mse_loss": mse, "l1_loss": l1}
    grads = {"W_enc": grad_W_enc, "b_enc": grad_b_enc, "W_dec": grad_W_dec, "b_dec": grad_b_dec}
    return StepResult(losses, grads, x_hat, f, firing_counts)


def use_fused_adam(trainer) -> None:
    """Give an sae-lens trainer the same Adam in torch's fused form (one kernel for all the
    parameters; on a CPU 11 ms a step against 252 ms for the default per-parameter loop at
    d_in 576, width 16384), and the same learning-rate schedule bound to it. The fused update
    rounds differently in the last bit, so a run's weights differ at that level from sae-lens's."""
    from sae_lens.training.optim import get_lr_scheduler

    cfg = trainer.cfg
    trainer.optimizer = torch.optim.Adam(
        trainer.sae.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), fused=True
    )
    trainer.lr_scheduler = get_lr_scheduler(
        cfg.lr_scheduler_name,
        lr=cfg.lr,
        optimizer=trainer.optimizer,
        warm_up_steps=cfg.lr_warm_up_steps,
        decay_steps=cfg.lr_decay_steps,
        training_steps=cfg.total_training_steps,
        lr_end=cfg.lr_end,
        num_cycles=cfg.n_restart_cycles,
    )


@torch.no_grad()
def record_firing(trainer, counts: torch.Tensor, fired: torch.Tensor | None = None) -> None:
    """sae-lens's firing statistics from per-latent firing ``counts`` of this step, without its
    boolean-mask assignment (a sync). ``fired``: the counts that decide "fired" (summed over DDP
    processes), when they differ from this process's own."""
    fired = counts if fired is None else fired
    trainer.n_forward_passes_since_fired.add_(1).masked_fill_(fired > 0, 0)
    trainer.act_freq_scores += counts
    trainer.n_frac_active_samples += trainer.cfg.train_batch_size_samples


def step_optimizer(trainer) -> None:
    """The end of sae-lens's ``_train_step``: Adam, zero the gradients, the schedules."""
    trainer.optimizer.step()
    trainer.optimizer.zero_grad()
    trainer.lr_scheduler.step()
    for scheduler in trainer.coefficient_schedulers.values():
        scheduler.step()


@functools.cache
def fused_trainer_class():
    """``FusedStandardTrainer``, built once on first use so importing this module stays cheap."""
    from sae_lens.saes.sae import TrainStepOutput
    from sae_lens.training.sae_trainer import SAETrainer

    class FusedStandardTrainer(SAETrainer):
        """sae-lens's ``SAETrainer`` with ``standard_sae_step`` as its step (see module docstring)."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            if not supports(self.sae):
                raise ValueError(
                    "the fused step implements sae-lens's standard L1 SAE only; "
                    "use trainer='sae-lens' for this SAE"
                )
            self.distributed = None
            self._params = dict(self.sae.named_parameters())  # fixed objects: look them up once
            if torch.device(self.cfg.device).type == "cuda":
                use_fused_adam(self)

        # CUDA graph of the step (gradients, firing counts, clipping), replayed every step: the
        # eager step launches ~50 kernels whose host time (~1.8 ms) exceeded the GPU's (~1.4 ms)
        # at d_in 576, width 16384, batch 4096 (GPU check). Adam, the schedulers and the running
        # statistics stay outside it (sae-lens replaces those tensors and steps on the host).
        use_cuda_graph: bool = True
        _graph = None
        reduces_own_gradients = True  # train_sae installs no all-reduce hooks for it

        def _gradients(self, sae, x: torch.Tensor, l1) -> StepResult:
            """Gradients of one step, all-reduced under DDP, set as ``.grad`` and clipped at 1."""
            dtype = torch.bfloat16 if self.cfg.autocast else None
            result = standard_sae_step(sae, x, l1, dtype)
            for name, grad in result.grads.items():
                if self.distributed is not None:
                    dist, world = self.distributed
                    dist.all_reduce(grad)
                    grad.div_(world)
                self._params[name].grad = grad
            torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
            return result

        def _graphed_gradients(self, sae, sae_in: torch.Tensor, l1: float) -> StepResult:
            # streams and graphs belong to the *current* device: make it the batch's (cuda:1 ...)
            with torch.cuda.device(sae_in.device):
                return self._graphed_gradients_on_device(sae, sae_in, l1)

        def _graphed_gradients_on_device(self, sae, sae_in: torch.Tensor, l1: float) -> StepResult:
            if self._graph is None:
                self._x = sae_in.detach().clone()
                self._l1 = torch.tensor(float(l1), device=sae_in.device)
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up outside the graph, as CUDA graphs need
                    for _ in range(3):
                        self._gradients(sae, self._x, self._l1)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self._static = self._gradients(sae, self._x, self._l1)
                self._graph = graph
            self._x.copy_(sae_in)
            self._l1.fill_(float(l1))
            self._graph.replay()
            for name, grad in self._static.grads.items():  # zero_grad() dropped them
                self._params[name].grad = grad
            return self._static

        def _train_step(self, sae, sae_in: torch.Tensor):
            sae.train()
            l1 = self.get_coefficients()["l1"]
            graphed = self.use_cuda_graph and sae_in.is_cuda and self.distributed is None
            if graphed:
                result = self._graphed_gradients(sae, sae_in, l1)
            else:
                result = self._gradients(sae, sae_in, l1)
            losses, _, sae_out, feature_acts, counts = result
            record_firing(self, counts)
            step_optimizer(self)
            return TrainStepOutput(
                sae_in=sae_in,
                sae_out=sae_out,
                feature_acts=feature_acts,
                hidden_pre=feature_acts,  # not kept: the ReLU runs in place or in the matmul
                loss=losses["mse_loss"] + losses["l1_loss"],
                losses=losses,
            )

    return FusedStandardTrainer

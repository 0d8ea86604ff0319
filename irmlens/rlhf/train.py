"""Fine-tune the base model against the reward model with trl: PPO (the paper's), GRPO or RLOO.

GRPO and RLOO take a Python reward callable directly; PPO gets the same reward through
``LexiconRewardAdapter``. Reward before/after is measured with the *true* RM on the same held-out
prompts and sampling seed; KL to the base is a Monte-Carlo estimate on the RLHF model's own samples.
Checkpoints every ``checkpoint_every`` steps; re-running after an interruption resumes from the
last one (trl's own resume for GRPO/RLOO, segment restarts for PPO).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from irmlens.errors import DamagedFileError
from irmlens.io import (
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    read_json,
    read_jsonl,
    sha256_file,
)
from irmlens.ranges import POSITIVE, SEED, SIZE, Int, OneOf, Real, check_fields, ranged
from irmlens.rlhf.recorder import RewardRecorder, make_metrics_callback, one_line_progress
from irmlens.rlhf.sampling import kl_estimate, sample_completions
from irmlens.rlhf.signals import lexicon_fraction, repetition_rate

ALGORITHMS = ("ppo", "grpo", "rloo")
REWARDS = ("lexicon", "shuffled", "zero")
# rlhf.report_to: the package each reporter needs (transformers' integrations)
REPORTERS = {"none": None, "tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


@dataclass
class RLHFConfig:
    """Defaults follow the paper's PPO set-up: review prefixes of 2-10 words as prompts, short
    completions (the paper: 8-20 tokens; here a fixed ``max_completion_length``), a KL penalty to the
    base model. ``kl_coef`` 0.2 keeps a tiny policy within a few nats of its reference; 0.05 let a
    probe's KL reach ~90 nats with the reward pinned at the clip (degenerate text)."""

    algorithm: str = ranged("ppo", OneOf(ALGORITHMS))
    # lexicon | shuffled (permuted utilities) | zero (KL only): null pairs
    reward: str = ranged("lexicon", OneOf(REWARDS))
    steps: int = ranged(100, SIZE)
    # completions per update (GRPO/RLOO: prompts x num_generations; a multiple of
    # mini_batch_size for PPO, of num_generations for GRPO/RLOO: __post_init__)
    batch_size: int = ranged(64, SIZE)
    mini_batch_size: int = ranged(16, SIZE)  # PPO minibatch
    ppo_epochs: int = ranged(4, SIZE)
    num_generations: int = ranged(8, SIZE)  # GRPO/RLOO group size (2 or more there)
    max_completion_length: int = ranged(16, SIZE)
    max_prompt_tokens: int = ranged(16, SIZE)
    # the implicit reward is kl_coef x the log-ratio: 0 has none
    kl_coef: float = ranged(0.2, POSITIVE)
    learning_rate: float = ranged(1e-4, Real(0.0, 1.0, lo_open=True))
    temperature: float = ranged(
        1.0,
        Real(0.0, 100.0, lo_open=True),
        new_run=(
            Real(0.01, 100.0),
            "sampling at a temperature near 0 divides the logits into infinities, and RLHF "
            "learns nothing",
        ),
    )
    n_train_prompts: int = ranged(2000, SIZE)  # at least the prompts of one update
    # the prompts sampled before and after RLHF
    n_eval_prompts: int = ranged(
        128,
        SIZE,
        new_run=(
            Int(1, 10_000),
            "the prompts sampled before and after RLHF: past 10,000 the evaluation outlasts the "
            "training while the reward's CI hardly narrows",
        ),
    )
    prompt_min_words: int = ranged(2, SIZE)
    prompt_max_words: int = ranged(10, SIZE)
    checkpoint_every: int = ranged(25, SIZE)
    sample_every: int = ranged(10, SIZE)
    logging_steps: int = ranged(1, SIZE)
    kl_warn_bound: float = ranged(20.0, POSITIVE)
    # opt-in: trl's per-step metrics to tensorboard (logs in rlhf/logs/), wandb or trackio
    # (their package must be installed: a pre-run check says so). metrics.jsonl is always written
    report_to: str = ranged("none", OneOf(tuple(REPORTERS)))
    seed: int = ranged(0, SEED)

    def __post_init__(self) -> None:
        """Each key's own rule, then the rules that need several of this section's keys."""
        check_fields(self, "rlhf")
        if self.prompt_min_words > self.prompt_max_words:
            raise ValueError(
                f"rlhf.prompt_min_words = {self.prompt_min_words} exceeds rlhf.prompt_max_words "
                f"= {self.prompt_max_words}"
            )
        if self.algorithm in ("grpo", "rloo") and self.num_generations < 2:
            raise ValueError(f"rlhf.num_generations must be 2 or more for {self.algorithm}")
        if self.algorithm in ("grpo", "rloo") and self.reward == "zero":
            # every reward 0 gives every advantage 0, and the KL term has zero gradient at the
            # reference: the "null model" would be the base model itself, not a fine-tuning
            raise ValueError(
                f"a zero reward trains nothing with {self.algorithm} (all advantages are 0): "
                "use reward 'shuffled' for a null pair (null.reward), or algorithm 'ppo'"
            )
        if self.algorithm in ("grpo", "rloo") and self.batch_size % self.num_generations:
            raise ValueError("rlhf.batch_size must be a multiple of rlhf.num_generations")
        if self.algorithm == "ppo" and self.batch_size % self.mini_batch_size:
            raise ValueError("rlhf.batch_size must be a multiple of rlhf.mini_batch_size")
        per_batch = self.batch_size // (self.num_generations if self.algorithm != "ppo" else 1)
        if self.n_train_prompts < per_batch:
            raise ValueError(
                f"rlhf.n_train_prompts = {self.n_train_prompts} is fewer than the {per_batch} "
                "prompts one update draws (rlhf.batch_size"
                + (" / num_generations" if self.algorithm != "ppo" else "")
                + "): raise n_train_prompts or lower batch_size"
            )


def training_reward_model(rm, kind: str, seed: int):
    """The RM the policy is trained against: the true one, or a null control."""
    from irmlens.rewards.lexicon import ZeroRewardModel

    if kind == "lexicon":
        return rm
    if kind == "shuffled":
        return rm.shuffled(seed)
    return ZeroRewardModel(rm)


def _truncate_metrics(path: Path, upto_step: int) -> None:
    """Drop rows logged after the checkpoint we resume from: they will be logged again."""
    if not path.exists():
        return
    keep = [row for row in read_jsonl(path) if row["step"] <= upto_step]
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in keep))


def _common_trl_args(cfg: RLHFConfig, out: Path, logs: Path) -> dict:
    if cfg.report_to == "tensorboard":
        # transformers' TensorBoard callback reads its folder from the environment only; its
        # default (under output_dir, the checkpoints) is removed when training ends
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(logs)
    return dict(
        output_dir=str(out),
        learning_rate=cfg.learning_rate,
        temperature=cfg.temperature,
        logging_steps=cfg.logging_steps,
        report_to=cfg.report_to,
        use_cpu=not torch.cuda.is_available(),
        # float32 for every algorithm: trl's GRPO/RLOO configs default to bf16 mixed precision
        # (on a CPU too), its PPO does not, and rewards, KLs and weight deltas should be comparable
        bf16=False,
        fp16=False,
        seed=cfg.seed,
        disable_tqdm=False,
        # trl turns it on by default to save GPU memory; on a CPU it recomputes every forward
        # pass in the backward pass for nothing (the same gradients, a third more time)
        gradient_checkpointing=torch.cuda.is_available(),
    )


@contextmanager
def _without_forced_collections(module):
    """On a CPU, skip the ``gc.collect()`` trl's PPO loop calls twice per update to give CUDA
    memory back: it frees nothing a CPU run needs and took 0.22 s a call in the tiny study (a
    fifth of its PPO time). Python's own collector still runs as usual."""
    import types

    if torch.cuda.is_available() or not hasattr(module, "gc"):
        yield
        return
    real = module.gc
    module.gc = types.SimpleNamespace(collect=lambda *args: 0)
    try:
        yield
    finally:
        module.gc = real


def _train_grpo_or_rloo(
    cfg, base_dir, tok, rm_train, recorder, prompts, ckpt_dir, metrics_path, extra_callbacks
):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    def reward_fn(completions, **kwargs) -> list[float]:
        rewards = rm_train.score(completions)
        recorder.add(list(completions), rewards)
        return rewards

    reward_fn.__name__ = "rm"
    args = dict(
        _common_trl_args(cfg, ckpt_dir, ckpt_dir.parent / "logs"),
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch_size,
        num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length,
        beta=cfg.kl_coef,
        save_strategy="steps",
        save_steps=cfg.checkpoint_every,
        save_total_limit=2,  # keep the previous one in case the newest was cut short
    )
    if cfg.algorithm == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer
    else:
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer
    last = _last_complete_hf_checkpoint(ckpt_dir)
    resumed_from = int(Path(last).name.split("-")[-1]) if last is not None else 0
    _truncate_metrics(metrics_path, resumed_from)
    trainer = Trainer(
        model=AutoModelForCausalLM.from_pretrained(
            base_dir, dtype=torch.float32, trust_remote_code=False
        ),
        reward_funcs=reward_fn,
        args=Config(**args),
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tok,
        callbacks=[
            make_metrics_callback(
                metrics_path, recorder, cfg.algorithm, cfg.sample_every, cfg.kl_warn_bound
            ),
            *extra_callbacks,
        ],
    )
    one_line_progress(trainer)
    try:
        trainer.train(resume_from_checkpoint=last)
    except (pickle.UnpicklingError, SafetensorError, EOFError, RuntimeError) as e:
        if last is None:
            raise
        raise DamagedFileError(
            f"the RLHF checkpoint {last} cannot be loaded ({type(e).__name__}: {e}): delete that "
            "folder to resume from the one before it (or from the start)"
        ) from None
    return trainer.model, resumed_from


def _load_checkpoint_tensors(path: Path):
    """``torch.load`` with ``weights_only`` (a checkpoint never runs code), a refusal or a
    truncated file named with the fix instead of a raw UnpicklingError."""
    try:
        return torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as e:
        raise DamagedFileError(
            f"{path} cannot be loaded as a checkpoint ({type(e).__name__}: {str(e)[:200]}): "
            f"delete {path.parent} to resume from the checkpoint before it (or from the start)"
        ) from None


def _last_complete_hf_checkpoint(ckpt_dir: Path) -> str | None:
    """The newest ``checkpoint-N`` that the HF Trainer finished writing (its trainer_state.json is
    written last); a folder left half-written by a kill is skipped."""
    if not ckpt_dir.exists():
        return None
    done = [p for p in ckpt_dir.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    done.sort(key=lambda p: int(p.name.split("-")[-1]))
    return str(done[-1]) if done else None


def _latest_ppo_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest ``step-N`` checkpoint whose files match the sha256s its state.json recorded.
    A damaged one is skipped with a warning (training resumes from an older one, or from the
    start), never loaded: a flipped byte in its weights would otherwise train on silently."""
    import warnings

    for p in sorted(ckpt_dir.glob("step-*"), reverse=True):
        if not (p / "state.json").exists():
            continue  # never finished writing (atomic_dir): not a checkpoint
        try:
            state = read_json(p / "state.json")
            bad = [
                rel
                for rel, sha in state.get("sha256", {}).items()
                if not (p / rel).is_file() or sha256_file(p / rel) != sha
            ]
        except (DamagedFileError, AttributeError) as e:
            bad = [f"state.json ({e})"]
        if not bad:
            return p
        warnings.warn(
            f"RLHF checkpoint {p} is damaged ({', '.join(bad)}): skipped; training resumes "
            "from an earlier checkpoint, or from the start",
            stacklevel=2,
        )
    return None


def _train_ppo(
    cfg, base_dir, tok, rm_train, recorder, prompts, ckpt_dir, metrics_path, extra_callbacks
):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, set_seed
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from irmlens.rlhf.ppo import LexiconRewardAdapter, fixed_length_prompts

    ids, context_length = fixed_length_prompts(tok, prompts, cfg.max_prompt_tokens)
    dataset = Dataset.from_dict({"input_ids": ids.tolist()})
    eval_dataset = Dataset.from_dict({"input_ids": ids[:8].tolist()})
    adapter = LexiconRewardAdapter(rm_train, tok, context_length, recorder)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    last = _latest_ppo_checkpoint(ckpt_dir)
    done = resumed_from = read_json(last / "state.json")["step"] if last else 0
    _truncate_metrics(metrics_path, done)
    policy_src = last / "policy" if last else base_dir
    value_src = last / "value" if last else base_dir
    policy = None
    while done < cfg.steps:
        seg = min(cfg.checkpoint_every, cfg.steps - done)
        policy = AutoModelForCausalLM.from_pretrained(
            policy_src, dtype=torch.float32, trust_remote_code=False
        )
        ref = AutoModelForCausalLM.from_pretrained(
            base_dir, dtype=torch.float32, trust_remote_code=False
        )
        # Seed every global RNG (python, numpy, torch) per segment: from_pretrained initialises
        # the value head from torch's, and trl's PPO draws its minibatch order from numpy's,
        # which it never seeds. Unseeded, every run gave another RLHF model.
        set_seed(cfg.seed + done)
        value = AutoModelForSequenceClassification.from_pretrained(
            value_src, num_labels=1, dtype=torch.float32, trust_remote_code=False
        )
        value.config.pad_token_id = tok.pad_token_id
        args = PPOConfig(
            **_common_trl_args(cfg, ckpt_dir / "trl", ckpt_dir.parent / "logs"),
            per_device_train_batch_size=cfg.batch_size,
            num_mini_batches=cfg.batch_size // cfg.mini_batch_size,
            num_ppo_epochs=cfg.ppo_epochs,
            total_episodes=seg * cfg.batch_size,
            response_length=cfg.max_completion_length,
            kl_coef=cfg.kl_coef,
            local_rollout_forward_batch_size=cfg.batch_size,
            num_sample_generations=0,
            save_strategy="no",
            stop_token=None,
            # constant: segments (see module doc) must not each decay the rate to zero
            lr_scheduler_type="constant",
        )
        args.seed = cfg.seed + done  # a fresh data order per segment
        trainer = PPOTrainer(
            args=args,
            processing_class=tok,
            model=policy,
            ref_model=ref,
            reward_model=adapter,
            value_model=value,
            train_dataset=dataset,
            eval_dataset=eval_dataset,
            callbacks=[
                make_metrics_callback(
                    metrics_path,
                    recorder,
                    "ppo",
                    cfg.sample_every,
                    cfg.kl_warn_bound,
                    response_tokens=float(cfg.max_completion_length),
                    step_offset=done,
                ),
                *extra_callbacks,
            ],
        )
        one_line_progress(trainer)
        if last is not None and (last / "optimizer.pt").exists():
            trainer.optimizer.load_state_dict(_load_checkpoint_tensors(last / "optimizer.pt"))
        with _without_forced_collections(sys.modules[PPOTrainer.__module__]):
            trainer.train()
        done += seg
        with atomic_dir(ckpt_dir / f"step-{done:06d}") as tmp:
            policy.save_pretrained(tmp / "policy")
            value.save_pretrained(tmp / "value")
            torch.save(trainer.optimizer.state_dict(), tmp / "optimizer.pt")
            files = sorted(p for p in tmp.rglob("*") if p.is_file())
            sha = {str(p.relative_to(tmp)): sha256_file(p) for p in files}
            atomic_write_json(tmp / "state.json", {"step": done, "sha256": sha})
        last = ckpt_dir / f"step-{done:06d}"
        for old in ckpt_dir.glob("step-*"):
            if old != last:
                shutil.rmtree(old, ignore_errors=True)
        policy_src, value_src = last / "policy", last / "value"
    if policy is None:  # every step was already checkpointed
        policy = AutoModelForCausalLM.from_pretrained(
            policy_src, dtype=torch.float32, trust_remote_code=False
        )
    return policy, resumed_from


def run_rlhf(
    base_dir: str | Path,
    reward_model,
    train_prompts: list[str],
    eval_prompts: list[str],
    cfg: RLHFConfig,
    out_model_dir: str | Path,
    rlhf_dir: str | Path,
    extra_callbacks: tuple = (),
) -> dict:
    """Train (or resume), write the RLHF model atomically to ``out_model_dir``, return a summary.

    ``extra_callbacks`` are transformers ``TrainerCallback``s handed to the trl trainer.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rlhf_dir = Path(rlhf_dir)
    rlhf_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = rlhf_dir / "metrics.jsonl"
    ckpt_dir = rlhf_dir / "checkpoints"
    rm_train = training_reward_model(reward_model, cfg.reward, cfg.seed)

    tok = AutoTokenizer.from_pretrained(base_dir, trust_remote_code=False)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    base = AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=torch.float32, trust_remote_code=False
    ).eval()

    t0 = time.time()
    before = sample_completions(base, tok, eval_prompts, cfg.max_completion_length, seed=cfg.seed)
    reward_before = reward_model.score(before.completions)
    recorder = RewardRecorder(reward_model.word_utility)
    train = _train_ppo if cfg.algorithm == "ppo" else _train_grpo_or_rloo
    policy, resumed_from = train(
        cfg,
        Path(base_dir),
        tok,
        rm_train,
        recorder,
        train_prompts,
        ckpt_dir,
        metrics_path,
        extra_callbacks,
    )
    policy = policy.eval()
    train_seconds = time.time() - t0

    after = sample_completions(policy, tok, eval_prompts, cfg.max_completion_length, seed=cfg.seed)
    reward_after = reward_model.score(after.completions)
    kl = kl_estimate(policy, base, after)
    wu = reward_model.word_utility
    summary = {
        "algorithm": cfg.algorithm,
        "steps": cfg.steps,
        "resumed_from_step": resumed_from,
        "reward_model": reward_model.name,
        "trained_against": rm_train.name,
        "reward_before": float(sum(reward_before) / len(reward_before)),
        "reward_after": float(sum(reward_after) / len(reward_after)),
        "kl": kl,
        "kl_warning": kl > cfg.kl_warn_bound,
        "hacking_signals": {
            "repetition_rate_before": repetition_rate(before.completions),
            "repetition_rate_after": repetition_rate(after.completions),
            "lexicon_fraction_before": lexicon_fraction(before.completions, wu),
            "lexicon_fraction_after": lexicon_fraction(after.completions, wu),
        },
        "train_seconds": round(train_seconds, 1),
        "n_eval_prompts": len(eval_prompts),
        "samples": [
            {"prompt": p, "before": b, "after": a}
            for p, b, a in list(
                zip(eval_prompts, before.completions, after.completions, strict=True)
            )[:8]
        ],
        "config": asdict(cfg),
    }
    # trl's PPO clears eos_token_id (stop_token unset) so training completions run to full length;
    # the saved model should stop at EOS like the base model does
    policy.generation_config.eos_token_id = tok.eos_token_id
    with atomic_dir(out_model_dir) as tmp:
        policy.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    atomic_write_json(rlhf_dir / "summary.json", summary)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return summary

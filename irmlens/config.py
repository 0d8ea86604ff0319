"""The study config: small typed dataclasses, loaded from TOML with strict key checking."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from irmlens.cache.store import DTYPES, HOOK_KINDS
from irmlens.errors import ConfigError
from irmlens.irm.fit import IRMConfig
from irmlens.irm.spaces import IRM_SPACES
from irmlens.models.pretrain import TOKENIZERS, PretrainConfig
from irmlens.ranges import MAX_SEED, Device, Each, Flag, Int, Name, OneOf, Real, Rule, Text
from irmlens.rlhf.train import ALGORITHMS, REWARDS, RLHFConfig
from sae_training.crosscoder import CROSSCODER_ARCHITECTURES, CrosscoderConfig
from sae_training.train import ARCHITECTURES, NORMALIZATIONS, TRAINERS, SAETrainingConfig


@dataclass
class DataConfig:
    # "vader" (the cached VADER lexicon), a path to word<TAB>utility lines, or "none": no reward
    # model is known (a pair you bring, model.rlhf), and the IRM explains the pair's own
    # model-level implicit reward (stage target)
    lexicon: str = "vader"
    implicit_min_count: int = 3  # lexicon "none": words seen fewer times in the cache get no target
    n_validation: int = 50
    n_heldout: int = 150
    seed: int = 0


@dataclass
class ModelConfig:
    base: str = "tiny"  # "tiny" (pretrained here), "smollm2", a local HF folder, or a hub name
    # Bring your own pair: the model after RLHF (a local HF folder or hub name). Empty: irmlens
    # runs the RLHF stage itself against the reward model.
    rlhf: str = ""
    # The null model (see [null]); empty: trained here when null.reward is not "none".
    null: str = ""
    device: str = "cpu"
    # Let a model folder run its own Python code (config.json / tokenizer_config.json
    # ``auto_map``). Off: such a folder is refused before anything loads it, whatever its name.
    trust_remote_code: bool = False


@dataclass
class NullConfig:
    """The null pair: base vs a model fine-tuned exactly like the RLHF model but against a reward
    with no relation to the lexicon's utilities (``shuffled``: utilities permuted among words;
    ``zero``: KL only). Its IRM, scored against the true utilities, says how much of the main
    result any fine-tuning of this size would give."""

    reward: str = "shuffled"  # shuffled | zero | none (no null pair)

    def __post_init__(self) -> None:
        if self.reward not in ("shuffled", "zero", "none"):
            raise ValueError(f"null.reward = {self.reward!r}; choose shuffled, zero or none")


@dataclass
class DiffConfig:
    """Per-feature divergence (shared dictionary) and paired-dictionary matching."""

    threshold: float = 0.5  # divergence score above which a feature is called divergent
    min_frequency: float = 1e-3  # features firing less often in both models are not scored
    matching_threshold: float = 0.7  # decoder cosine of a matched pair to call it shared
    top_n: int = 50  # divergent features listed in report.json
    n_cards: int = 24  # feature cards in the report (most divergent + the sparse IRM's features)


@dataclass
class LayersConfig:
    top_k: int = 1
    relative: bool = True


@dataclass
class CacheConfig:
    n_ctx: int = 64
    max_rows: int = 2000
    batch_size: int = 32
    dtype: str = "bfloat16"  # bfloat16 | float32 | int8 (per-row scale)
    # the activations cached, and studied: dictionaries are trained on each kind and the IRM is
    # fitted on each; the first is the one the diff, validation and cards read (the paper's:
    # "mlp_out")
    hook_kinds: list[str] = field(default_factory=lambda: ["resid_post"])
    shard_rows: int = 256  # token rows per shard

    def __post_init__(self) -> None:
        from irmlens.cache.store import DTYPES, HOOK_KINDS

        if self.dtype not in DTYPES:
            raise ValueError(f"cache.dtype = {self.dtype!r}; choose one of {DTYPES}")
        unknown = [k for k in self.hook_kinds if k not in HOOK_KINDS]
        if unknown or not self.hook_kinds:
            raise ValueError(f"cache.hook_kinds must be a non-empty subset of {sorted(HOOK_KINDS)}")


@dataclass
class SAEStageConfig:
    """SAEs per model (base, rlhf) and one shared SAE on all models' activations (base, rlhf and
    the null model when there is one), per studied layer
    and per width (``width_multipliers`` x d_model; the paper: 1x and 2x). The IRM uses the widest
    shared SAE; MMCS compares the narrowest and widest dictionary of each model."""

    width_multipliers: list[float] = field(default_factory=lambda: [2, 4])
    architecture: str = "standard"  # standard | topk | batchtopk | jumprelu
    l1_coefficient: float = 1.0
    k: int = 32
    lr: float = 1e-3
    batch_size: int = 1024
    epochs: float = 4.0
    n_checkpoints: int = 2
    ce_eval_rows: int = 64  # token rows used for CE loss recovered
    # A wider, less sparse shared dictionary for the IRM feature-space comparison: TopK with this
    # k at the widest width (0: none).
    wide_topk_k: int = 64
    # its width in multiples of d_model (0: the widest of width_multipliers) and its kind (topk
    # or batchtopk): real-model studies use 4x-16x beside the paper's L1 at 1x and 2x
    wide_topk_multiplier: float = 0.0
    wide_topk_architecture: str = "topk"
    # Bring your own dictionary: a SAELens SAE folder used as the study's shared dictionary at
    # its hook (which becomes the IRM layer, and is studied whatever the layer ranking says)
    # instead of training one; its width is the study's widest. "" (the default): train one.
    source: str = ""
    # A crosscoder over every cached model at the IRM layer (none | batchtopk | l1; see
    # sae_training/crosscoder.py), beside the shared and paired SAEs: its latents are tagged by
    # relative decoder norm and latent scaling (stage diff) and form IRM comparison spaces.
    # Width: crosscoder_multiplier x d_model (0: the widest width); sae.lr, batch_size, epochs.
    crosscoder: str = "batchtopk"
    crosscoder_k: int = 32
    crosscoder_multiplier: float = 0.0
    crosscoder_l1_coefficient: float = 0.041
    trainer: str = "auto"  # auto | fused | sparse | sae-lens (sae_training.train.SAETrainingConfig)
    # input normalisation of every dictionary: "expected_average_only_in" (scale to norm
    # sqrt(d_in)), "covariance_whitening" (PCA whitening, so low-variance directions, where
    # RLHF's change lies in the tiny default, get features too; see docs/concepts.md) or "none"
    normalize: str = "expected_average_only_in"

    def __post_init__(self) -> None:
        if not self.width_multipliers or any(m <= 0 for m in self.width_multipliers):
            raise ValueError(
                f"sae.width_multipliers = {self.width_multipliers}: give one or more positive "
                "multiples of d_model, e.g. [2, 4]"
            )
        if self.wide_topk_architecture not in ("topk", "batchtopk"):
            raise ValueError(
                f"sae.wide_topk_architecture = {self.wide_topk_architecture!r}: use topk or "
                "batchtopk"
            )
        if self.wide_topk_k < 0:
            raise ValueError(f"sae.wide_topk_k = {self.wide_topk_k}: use 0 (none) or a k >= 1")
        self.training_config(1, 0, "cpu")  # the same checks as the trainer's, at load time
        if self.crosscoder != "none":
            self.crosscoder_config(self.crosscoder_k, 0, "cpu")
        _ = self.source_info  # a folder that is not a SAELens SAE fails here, at load

    @cached_property
    def source_info(self):
        """The ``source`` folder's hook, layer and sizes (None: no source), read once."""
        if not self.source:
            return None
        from irmlens.models.sources import resolve_sae_source
        from sae_training.train import read_sae_folder

        try:  # a folder, or "<release>:<sae id>" from SAELens's directory (downloaded once)
            return read_sae_folder(resolve_sae_source(self.source))
        except ValueError as e:
            raise ValueError(f"sae.source = {self.source!r}: {e}") from None

    def crosscoder_config(self, width: int, seed: int, device: str) -> CrosscoderConfig:
        return CrosscoderConfig(
            width=width,
            architecture=self.crosscoder,
            k=self.crosscoder_k,
            l1_coefficient=self.crosscoder_l1_coefficient,
            lr=self.lr,
            batch_size=self.batch_size,
            epochs=self.epochs,
            n_checkpoints=self.n_checkpoints,
            seed=seed,
            device=device,
            # sae.trainer = "sae-lens" asks for the libraries' dense steps everywhere
            trainer="dense" if self.trainer == "sae-lens" else "auto",
        )

    def training_config(self, width: int, seed: int, device: str) -> SAETrainingConfig:
        return SAETrainingConfig(
            width=width,
            architecture=self.architecture,
            l1_coefficient=self.l1_coefficient,
            k=self.k,
            lr=self.lr,
            batch_size=self.batch_size,
            epochs=self.epochs,
            n_checkpoints=self.n_checkpoints,
            seed=seed,
            device=device,
            trainer=self.trainer,
            normalize=self.normalize,
        )


@dataclass
class ValidateConfig:
    """The causal validation (stage ``validate``): feature sets ablated in the RLHF model and
    steered into the base model, scored on held-out prompts (see irmlens/stages/validate.py)."""

    n_prompts: int = 256  # held-out prompts, the same for every arm
    seed: int = 0  # prompt choice and sampling: one seed for every arm, so arms pair up
    steering_scales: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    n_random_draws: int = 5  # matched random feature sets
    n_bootstrap: int = 1000
    perplexity_texts: int = 64  # held-out reviews whose perplexity each arm reports
    paper_prefix_words: int = 5  # the paper's number: continuations of prefixes this long
    single_feature_effects: bool = True  # each sparse-IRM feature ablated alone (for its card)
    single_feature_prompts: int = 64  # the first this many of the prompts, for those
    # the sparse crosscoder IRM's latents ablated (other models run in lockstep) and steered,
    # beside matched random latents (needs sae.crosscoder)
    crosscoder: bool = True


@dataclass
class LabelsConfig:
    """Reward-relevance labels of features (stage ``labels``, irmlens/labels/)."""

    min_mass: float = 0.25  # lexicon labeler: share of activation on lexicon words
    min_utility: float = 0.5  # lexicon labeler: |activation-weighted mean utility|
    # the LLM labeler on the sparse IRM's features: "none", "local" (an HF chat model folder in
    # llm_model; "smollm2": SmolLM2-135M-Instruct, offline) or "openai" (IRMLENS_LLM_* env)
    llm: str = "local"
    llm_model: str = "smollm2"
    n_contexts: int = 8  # top contexts shown per feature
    # what the LLM is told the reward model rewards (empty: a sentence made from the lexicon)
    reward_description: str = ""


@dataclass
class StudyConfig:
    name: str = "study"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    rlhf: RLHFConfig = field(default_factory=RLHFConfig)
    null: NullConfig = field(default_factory=NullConfig)
    layers: LayersConfig = field(default_factory=LayersConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    sae: SAEStageConfig = field(default_factory=SAEStageConfig)
    diff: DiffConfig = field(default_factory=DiffConfig)
    irm: IRMConfig = field(default_factory=IRMConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)

    def __post_init__(self) -> None:
        """The rules that need more than one section, checked at load so that a config which
        cannot finish fails before hours of compute, naming the key and the fix."""
        space = self.irm.space
        if self.model.base == "tiny":  # its sizes are in this config; other models': preflight
            p = self.pretrain
            check_dimensions(
                self,
                p.d_model,
                p.n_layer,
                f"the tiny model (pretrain.n_layer = {p.n_layer}, pretrain.d_model = {p.d_model})",
            )
            if p.tokenizer == "bpe" and p.vocab_size < MIN_BPE_VOCAB:
                raise ValueError(
                    f"pretrain.vocab_size = {p.vocab_size} is too small for byte-level BPE (256 "
                    f"byte tokens and the special tokens): use {MIN_BPE_VOCAB} or more, or "
                    'pretrain.tokenizer = "word"'
                )
        src = self.sae.source_info
        if src is not None and src.kind != self.cache.hook_kinds[0]:
            raise ValueError(
                f"sae.source reads {src.hook_name} ({src.kind}), but the study's hook kind is "
                f"cache.hook_kinds[0] = {self.cache.hook_kinds[0]!r}: put {src.kind!r} first in "
                "cache.hook_kinds"
            )
        if self.data.lexicon == "none" and not self.model.rlhf:
            raise ValueError(
                "data.lexicon = 'none' studies a pair whose reward model is unknown, so irmlens "
                "cannot run RLHF itself: give the tuned model as model.rlhf (a local HF folder or "
                "hub name), or a lexicon as data.lexicon"
            )
        if self.null.reward == "zero" and self.rlhf.algorithm in ("grpo", "rloo"):
            raise ValueError(
                f"null.reward = 'zero' trains nothing with rlhf.algorithm = "
                f"{self.rlhf.algorithm!r} (every advantage is 0): use null.reward = 'shuffled', "
                "or 'none' for no null pair"
            )
        if space != "auto":
            from irmlens.irm.spaces import SPACES

            problem = SPACES[space].unmet(self)
            if problem:
                raise ValueError(f"irm.space = {space!r} {problem}, or choose another irm.space")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


MIN_BPE_VOCAB = 300


def check_dimensions(cfg: StudyConfig, d_model: int, n_layer: int, model: str) -> None:
    """The rules that need the model's width and depth: the tiny model's are in the config
    (checked at load), a given model's are read from its config.json before a run starts."""
    if cfg.layers.top_k > n_layer:
        raise ConfigError(
            f"layers.top_k = {cfg.layers.top_k} but {model} has {n_layer} layers: lower "
            "layers.top_k"
        )
    s = cfg.sae
    widths = sorted({int(m * d_model) for m in s.width_multipliers})
    if widths[0] < 1:
        raise ConfigError(
            f"sae.width_multipliers = {s.width_multipliers} gives a dictionary of width "
            f"{widths[0]} for d_model {d_model} ({model}): use multipliers >= {1 / d_model:.3g}"
        )
    if s.k > widths[0]:  # read by topk and batchtopk; refused for all: it is meaningless
        raise ConfigError(
            f"sae.k = {s.k} exceeds the narrowest dictionary's width {widths[0]} (d_model "
            f"{d_model} x {min(s.width_multipliers):g}, {model}): lower sae.k"
        )
    topk_width = int(s.wide_topk_multiplier * d_model) if s.wide_topk_multiplier else widths[-1]
    if s.wide_topk_k and topk_width < 1:
        raise ConfigError(
            f"sae.wide_topk_multiplier = {s.wide_topk_multiplier} gives a TopK dictionary of width "
            f"{topk_width} for d_model {d_model} ({model}): raise it (0: the widest width)"
        )
    if s.wide_topk_k > topk_width:
        raise ConfigError(
            f"sae.wide_topk_k = {s.wide_topk_k} exceeds the wide TopK dictionary's width "
            f"{topk_width} ({model}): lower sae.wide_topk_k"
        )
    src = s.source_info
    if src is not None:
        if src.d_in != d_model:
            raise ConfigError(
                f"sae.source {src.path} reads {src.d_in}-dimensional activations, but {model} "
                f"has d_model {d_model}: give an SAE trained on this model"
            )
        if src.layer >= n_layer:
            raise ConfigError(
                f"sae.source {src.path} reads {src.hook_name}, but {model} has {n_layer} layers: "
                "give an SAE trained on this model"
            )
        if widths[-1] > src.d_sae:
            raise ConfigError(
                f"sae.width_multipliers = {s.width_multipliers} trains dictionaries of width up "
                f"to {widths[-1]}, wider than sae.source's {src.d_sae} (the study's widest): "
                f"use multipliers <= {src.d_sae / d_model:.4g}"
            )
        widths = sorted({*widths, src.d_sae})
    cc_width = int(s.crosscoder_multiplier * d_model) if s.crosscoder_multiplier else widths[-1]
    if s.crosscoder != "none" and not 1 <= s.crosscoder_k <= cc_width:
        raise ConfigError(
            f"sae.crosscoder_k = {s.crosscoder_k} exceeds the crosscoder's width {cc_width} "
            f"(d_model {d_model}, {model}): lower sae.crosscoder_k or raise "
            "sae.crosscoder_multiplier"
        )
    for key, k in (("irm.sparse_k", cfg.irm.sparse_k),):
        if k > widths[-1]:
            raise ConfigError(
                f"{key} = {k} exceeds the widest dictionary's width {widths[-1]} (d_model "
                f"{d_model} x {max(s.width_multipliers):g}, {model}): lower {key}"
            )


# ------------------------------------------------------------------ the allowed value of every key
# One rule per key, checked at load before any section is built (``_build``): a bad value fails
# naming the key, the value and what would do. Rules that need two keys are in the sections'
# ``__post_init__`` and ``StudyConfig.__post_init__``; rules that need the data or the machine
# (corpus size, a model's width, whether CUDA exists) in ``irmlens.stages.preflight``, which runs
# before a run folder is claimed. tests/test_config.py checks that every key has a rule.
_SIZE = Int(1)  # a count or size: 1 or more
_SEED = Int(0, MAX_SEED)
_POSITIVE = Real(0.0, lo_open=True)
_NONNEGATIVE = Real(0.0)
RANGES: dict[str, Rule] = {
    "name": Name(),
    "seed": _SEED,
    # [data]
    "data.lexicon": Text(nonempty=True),  # "vader" or a file (its content: rewards/lexicon.py)
    "data.n_validation": _SIZE,
    "data.n_heldout": _SIZE,
    "data.implicit_min_count": _SIZE,  # n_validation + n_heldout < the corpus: checked in preflight
    "data.seed": _SEED,
    # [model]
    "model.base": Text(nonempty=True),
    "model.rlhf": Text(),
    "model.null": Text(),
    "model.device": Device(),  # and this machine has it: preflight
    "model.trust_remote_code": Flag(),
    # [pretrain]
    "pretrain.vocab_size": Int(16),  # byte-level BPE needs more: StudyConfig.__post_init__
    "pretrain.tokenizer": OneOf(TOKENIZERS),
    "pretrain.n_layer": _SIZE,
    "pretrain.d_model": _SIZE,  # a multiple of n_head: PretrainConfig; NEW_RUN_LIMITS; preflight
    "pretrain.n_head": _SIZE,
    "pretrain.n_ctx": Int(8),  # bounded for a new run (NEW_RUN_LIMITS), its memory: preflight
    "pretrain.batch_size": _SIZE,
    "pretrain.lr": Real(0.0, 1.0, lo_open=True),
    "pretrain.warmup_steps": Int(0),
    "pretrain.max_steps": _SIZE,
    "pretrain.seed": _SEED,
    # [rlhf]
    "rlhf.algorithm": OneOf(ALGORITHMS),
    "rlhf.reward": OneOf(REWARDS),
    "rlhf.steps": _SIZE,
    "rlhf.batch_size": _SIZE,
    "rlhf.mini_batch_size": _SIZE,  # divides batch_size (ppo): RLHFConfig
    "rlhf.ppo_epochs": _SIZE,
    "rlhf.num_generations": _SIZE,  # 2 or more, dividing batch_size (grpo, rloo): RLHFConfig
    "rlhf.max_completion_length": _SIZE,
    "rlhf.max_prompt_tokens": _SIZE,
    "rlhf.kl_coef": _POSITIVE,  # the implicit reward is kl_coef x the log-ratio: 0 has none
    "rlhf.learning_rate": Real(0.0, 1.0, lo_open=True),
    "rlhf.temperature": Real(0.0, 100.0, lo_open=True),  # >= 0.01 for a new run: NEW_RUN_LIMITS
    "rlhf.n_train_prompts": _SIZE,  # at least batch_size: RLHFConfig
    "rlhf.n_eval_prompts": _SIZE,  # bounded for a new run: NEW_RUN_LIMITS
    "rlhf.prompt_min_words": _SIZE,
    "rlhf.prompt_max_words": _SIZE,
    "rlhf.checkpoint_every": _SIZE,
    "rlhf.sample_every": _SIZE,
    "rlhf.logging_steps": _SIZE,
    "rlhf.kl_warn_bound": _POSITIVE,
    "rlhf.seed": _SEED,
    # [null]
    "null.reward": OneOf(("shuffled", "zero", "none")),
    # [layers]
    "layers.top_k": _SIZE,  # at most the model's layers: StudyConfig / preflight
    "layers.relative": Flag(),
    # [cache]
    "cache.n_ctx": Int(8),  # at most the model's positions: StudyConfig / preflight
    "cache.max_rows": _SIZE,
    "cache.batch_size": _SIZE,
    "cache.dtype": OneOf(DTYPES),
    "cache.hook_kinds": Each(OneOf(tuple(HOOK_KINDS)), unique=True),
    "cache.shard_rows": _SIZE,
    # [sae]
    "sae.width_multipliers": Each(Real(0.0, 1024.0, lo_open=True)),
    "sae.architecture": OneOf(ARCHITECTURES),
    "sae.l1_coefficient": _POSITIVE,
    "sae.k": _SIZE,  # at most the narrowest width: StudyConfig / preflight
    "sae.lr": Real(0.0, 1.0, lo_open=True),
    "sae.batch_size": _SIZE,
    "sae.epochs": Real(0.0, 10_000.0, lo_open=True),
    "sae.n_checkpoints": Int(0, 1000),
    "sae.ce_eval_rows": _SIZE,
    "sae.wide_topk_k": Int(0),  # 0: none; else at most its width
    "sae.wide_topk_multiplier": Real(0.0, 1024.0),  # 0: the widest width
    "sae.wide_topk_architecture": OneOf(("topk", "batchtopk")),
    "sae.source": Text(),  # "" or a SAELens SAE folder: SAEStageConfig / check_dimensions
    "sae.crosscoder": OneOf(("none", *CROSSCODER_ARCHITECTURES)),
    "sae.crosscoder_k": _SIZE,  # at most its width: StudyConfig / preflight
    "sae.crosscoder_multiplier": Real(0.0, 1024.0),  # 0: the widest width
    "sae.crosscoder_l1_coefficient": _POSITIVE,
    "sae.trainer": OneOf(TRAINERS),
    "sae.normalize": OneOf(NORMALIZATIONS),
    # [diff]
    "diff.threshold": Real(0.0, 1.5),  # the divergence score lies in [0, sqrt 2]
    "diff.min_frequency": Real(0.0, 1.0, hi_open=True),
    "diff.matching_threshold": Real(0.0, 1.0),  # a decoder cosine
    "diff.top_n": Int(0),
    "diff.n_cards": Int(0),
    # [irm]
    "irm.heldout_fraction": Real(0.0, 1.0, lo_open=True, hi_open=True),  # see NEW_RUN_LIMITS
    "irm.nonlexicon_ratio": Real(0.0, 1000.0),
    "irm.min_word_count": _SIZE,
    "irm.alphas": Each(Real(0.0, 1e12, lo_open=True)),
    "irm.cv_folds": Int(2, 100),
    "irm.n_shuffles": Int(1, 100_000),
    "irm.sparse_k": _SIZE,  # at most the widest width: StudyConfig / preflight
    "irm.space": OneOf(("auto", *IRM_SPACES)),
    "irm.paper_contexts_per_word": _SIZE,  # bounded for a new run: NEW_RUN_LIMITS
    "irm.seed": _SEED,
    # [validate]
    "validate.n_prompts": Int(2),  # a bootstrap needs two
    "validate.seed": _SEED,
    "validate.steering_scales": Each(Real(-100.0, 100.0)),
    "validate.n_random_draws": Int(1, 100),
    "validate.n_bootstrap": Int(10, 1_000_000),
    "validate.perplexity_texts": _SIZE,
    "validate.paper_prefix_words": _SIZE,
    "validate.single_feature_effects": Flag(),
    "validate.single_feature_prompts": Int(2),
    "validate.crosscoder": Flag(),
    # [labels]
    "labels.min_mass": Real(0.0, 1.0),
    "labels.min_utility": _NONNEGATIVE,
    "labels.llm": OneOf(("none", "local", "openai")),
    "labels.llm_model": Text(nonempty=True),
    "labels.n_contexts": Int(1, 100),
    "labels.reward_description": Text(),
}


# Bounds on the work a new run would do, checked when a config is loaded to run (``new_run``), not
# when a finished run's config is read back, so that a run made before a bound existed still
# reports. Each says why: a value past it used to run for hours or crash late.
NEW_RUN_LIMITS: dict[str, tuple[Rule, str]] = {
    "rlhf.temperature": (
        Real(0.01, 100.0),
        "sampling at a temperature near 0 divides the logits into infinities, and RLHF learns "
        "nothing",
    ),
    "rlhf.n_eval_prompts": (
        Int(1, 10_000),
        "the prompts sampled before and after RLHF: past 10,000 the evaluation outlasts the "
        "training while the reward's CI hardly narrows",
    ),
    "irm.heldout_fraction": (
        Real(0.05, 0.95),
        "both sides of the IRM's word split need words (the split itself is checked against the "
        "corpus before the run)",
    ),
    "irm.paper_contexts_per_word": (
        Int(1, 64),
        "the paper's estimator runs two forward passes per word and context, and averages a "
        "handful of contexts",
    ),
    "pretrain.n_ctx": (Int(8, 65_536), "the tiny LM's positions (its memory is checked too)"),
    "pretrain.d_model": (Int(1, 65_536), "the tiny LM's width (its memory is checked too)"),
}


def check_new_run(cfg: StudyConfig) -> None:
    """The rules for a config about to run (not for reading a finished run's config back):
    ``NEW_RUN_LIMITS``, and the tiny model's positions against every sequence the study feeds
    it (a given model's: before the run, from its config.json)."""
    for key, (rule, why) in NEW_RUN_LIMITS.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        problem = rule.problem(value)
        if problem:
            raise ConfigError(f"{key} = {value!r} {problem}: {why}")
    if cfg.model.base == "tiny":
        p = cfg.pretrain
        check_positions(cfg, p.n_ctx, f"the tiny model (pretrain.n_ctx = {p.n_ctx})")


# Keys irmlens no longer reads: a config (or a run folder's config.toml) that has one still loads,
# with a warning saying why it is ignored.
REMOVED_KEYS = {
    "pretrain.time_budget_s": "pretraining runs exactly pretrain.max_steps steps on every machine "
    "(a wall-clock budget made the model depend on the machine's speed)",
}


def _build(cls, values: dict[str, Any], where: str):
    known = {f.name: f for f in dataclasses.fields(cls)}
    for k in [k for k in values if f"{where}{k}" in REMOVED_KEYS and k not in known]:
        import warnings

        warnings.warn(f"config key {where}{k} is ignored: {REMOVED_KEYS[where + k]}", stacklevel=2)
        values = {kk: v for kk, v in values.items() if kk != k}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown config key{'s' if len(unknown) > 1 else ''} {', '.join(repr(f'{where}{k}') for k in unknown)}; "
            f"valid keys in [{where.rstrip('.') or 'top level'}]: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for k, v in values.items():
        f = known[k]
        if dataclasses.is_dataclass(f.type) or (isinstance(f.type, str) and f.type in _SECTIONS):
            sub = _SECTIONS[f.type if isinstance(f.type, str) else f.type.__name__]
            if not isinstance(v, dict):
                raise ConfigError(f"[{where}{k}] must be a table")
            kwargs[k] = _build(sub, v, f"{where}{k}.")
        else:
            _check_type(f, v, where)
            problem = RANGES[f"{where}{k}"].problem(v)
            if problem:
                raise ConfigError(f"{where}{k} = {v!r} {problem}")
            kwargs[k] = v
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None  # each names its key(s) and the fix


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _check_type(f: dataclasses.Field, value: Any, where: str) -> None:
    """A value of the default's kind (numbers for numbers, lists of numbers for lists of
    numbers...), so a quoted "5" fails here naming its key, not later inside a stage."""
    default = f.default
    if default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    if default is None or default is dataclasses.MISSING:
        return  # optional settings: their own checks apply
    key = f"{where}{f.name}"

    def fits(kind: type, v: Any) -> bool:
        if kind is bool:
            return isinstance(v, bool)
        if kind is float:
            return isinstance(v, int | float) and not isinstance(v, bool)
        if kind is int:
            return isinstance(v, int) and not isinstance(v, bool)
        return isinstance(v, kind)

    if isinstance(default, list):
        kinds = {type(x) for x in default}
        kind = (
            float if kinds and kinds <= {int, float} else (kinds.pop() if len(kinds) == 1 else None)
        )
        if not isinstance(value, list) or (kind and not all(fits(kind, x) for x in value)):
            raise ConfigError(f"{key} = {value!r} must be a list like {default!r}")
        return
    kind = float if type(default) is float else type(default)
    if kind in _KINDS and not fits(kind, value):
        raise ConfigError(
            f"{key} = {value!r} must be {_KINDS[kind]} (e.g. {default!r}), "
            f"not {type(value).__name__}"
        )


_SECTIONS = {
    c.__name__: c
    for c in (
        DataConfig,
        ModelConfig,
        PretrainConfig,
        RLHFConfig,
        NullConfig,
        LayersConfig,
        CacheConfig,
        SAEStageConfig,
        DiffConfig,
        IRMConfig,
        ValidateConfig,
        LabelsConfig,
    )
}


def config_from_dict(
    values: dict[str, Any], check_device: bool = True, new_run: bool = True
) -> StudyConfig:
    """The config of ``values`` (a parsed TOML file), every key checked against ``RANGES``.
    ``check_device``: also require that this machine has ``model.device``; ``new_run``: also the
    rules for a config about to run (``check_new_run``). Both off only to read a finished run's
    config (it names the machine it ran on, and may predate a bound; a run checks them again)."""
    cfg = _build(StudyConfig, values, "")
    if check_device:
        check_device_exists(cfg)
    if new_run:
        check_new_run(cfg)
    return cfg


def check_positions(cfg: StudyConfig, n_positions: int, model: str) -> None:
    """Every sequence the study feeds the models fits their positions: the cached rows (and the
    perplexity texts, cut to the same length), RLHF's padded prompts plus completions, and the
    evaluation prompts (at least a token per word and BOS) plus completions."""
    r = cfg.rlhf
    if cfg.cache.n_ctx > n_positions:
        raise ConfigError(
            f"cache.n_ctx = {cfg.cache.n_ctx} but {model} has {n_positions} positions: lower "
            f"cache.n_ctx to {n_positions} or less"
        )
    if not cfg.model.rlhf and r.max_prompt_tokens + r.max_completion_length > n_positions:
        raise ConfigError(
            f"rlhf.max_prompt_tokens + rlhf.max_completion_length = {r.max_prompt_tokens} + "
            f"{r.max_completion_length} exceeds the {n_positions} positions of {model}: lower "
            "them so that prompt and completion fit"
        )
    if r.prompt_max_words + 1 + r.max_completion_length > n_positions:
        raise ConfigError(
            f"rlhf.prompt_max_words = {r.prompt_max_words} (+ BOS) and rlhf.max_completion_length "
            f"= {r.max_completion_length} exceed the {n_positions} positions of {model} (the "
            "evaluation and validation prompts are up to prompt_max_words words): lower them"
        )


def check_device_exists(cfg: StudyConfig) -> None:
    from irmlens.ranges import device_problem

    problem = device_problem(cfg.model.device)
    if problem:
        raise ConfigError(f"model.device = {cfg.model.device!r}: {problem}")


def load_config(path: str | Path, check_device: bool = True, new_run: bool = True) -> StudyConfig:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist (try experiments/configs/tiny.toml)")
    if not path.is_file():
        raise ConfigError(f"{path} is a folder, not a config file: give a .toml file inside it")
    try:
        # a BOM (what some Windows editors save) is not TOML; the text after it is read as is
        values = tomllib.loads(path.read_text(encoding="utf-8").removeprefix("\ufeff"))
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path} is not UTF-8 text (byte {e.start}): save the config as UTF-8"
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"cannot read the config {path}: {e.strerror}") from None
    # a file name may hold characters a folder name should not: the default name keeps the rest
    values.setdefault("name", re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip("-.") or "study")
    return config_from_dict(values, check_device, new_run)


_TOML_ESCAPES = {"\\": "\\\\", '"': '\\"'}


def _toml_char(c: str) -> str:
    return f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):  # a TOML basic string: backslash, quote and control characters escaped
        return '"' + "".join(_TOML_ESCAPES.get(c) or _toml_char(c) for c in v) + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dump_config(cfg: StudyConfig) -> str:
    """The resolved config as TOML (scalars first, then one table per section)."""
    d = cfg.to_dict()
    lines = [f"{k} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, dict)]
    for k, v in d.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]"] + [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"

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
from irmlens.models.pretrain import PretrainConfig
from irmlens.ranges import (
    NONNEGATIVE,
    POSITIVE,
    SEED,
    SIZE,
    Device,
    Each,
    Flag,
    Int,
    Name,
    OneOf,
    Real,
    Rule,
    Text,
    check_fields,
    field_rules,
    ranged,
)
from irmlens.rlhf.train import RLHFConfig
from sae_training.crosscoder import CROSSCODER_ARCHITECTURES, CrosscoderConfig
from sae_training.train import ARCHITECTURES, NORMALIZATIONS, TRAINERS, SAETrainingConfig


@dataclass
class DataConfig:
    # "vader" (the cached VADER lexicon), a path to word<TAB>utility lines (its format:
    # rewards/lexicon.py), or "none": no reward model is known (a pair you bring, model.rlhf), and
    # the IRM explains the pair's own model-level implicit reward (stage target)
    lexicon: str = ranged("vader", Text(nonempty=True))
    # lexicon "none": words seen fewer times in the cache get no target
    implicit_min_count: int = ranged(3, SIZE)
    # reviews held out for RLHF's evaluation and for the study (their sum below the corpus's size:
    # irmlens.checks, before the run)
    n_validation: int = ranged(50, SIZE)
    n_heldout: int = ranged(150, SIZE)
    seed: int = ranged(0, SEED)

    def __post_init__(self) -> None:
        check_fields(self, "data")


@dataclass
class ModelConfig:
    # "tiny" (pretrained here), "smollm2", a local HF folder, or a hub name
    base: str = ranged("tiny", Text(nonempty=True))
    # Bring your own pair: the model after RLHF (a local HF folder or hub name). Empty: irmlens
    # runs the RLHF stage itself against the reward model.
    rlhf: str = ranged("", Text())
    # The null model (see [null]); empty: trained here when null.reward is not "none".
    null: str = ranged("", Text())
    # cpu, cuda[:i] or mps (that this machine has it: irmlens.checks.check_device_exists)
    device: str = ranged("cpu", Device())
    # Let a model folder run its own Python code (config.json / tokenizer_config.json
    # ``auto_map``). Off: such a folder is refused before anything loads it, whatever its name.
    trust_remote_code: bool = ranged(False, Flag())

    def __post_init__(self) -> None:
        check_fields(self, "model")


@dataclass
class NullConfig:
    """The null pair: base vs a model fine-tuned exactly like the RLHF model but against a reward
    with no relation to the lexicon's utilities (``shuffled``: utilities permuted among words;
    ``zero``: KL only). Its IRM, scored against the true utilities, says how much of the main
    result any fine-tuning of this size would give."""

    reward: str = ranged("shuffled", OneOf(("shuffled", "zero", "none")))  # none: no null pair

    def __post_init__(self) -> None:
        check_fields(self, "null")


@dataclass
class DiffConfig:
    """Per-feature divergence (shared dictionary) and paired-dictionary matching."""

    # divergence above which a feature is called divergent: the RMS norm of the change it writes
    # as a fraction of the activations' RMS norm (0.05: 5%; the planted and tiny studies put
    # their largest changes at 0.1-0.3)
    threshold: float = ranged(0.05, Real(0.0, 1.5))
    # features firing less often in both models are not scored
    min_frequency: float = ranged(1e-3, Real(0.0, 1.0, hi_open=True))
    # decoder cosine of a matched pair to call it shared
    matching_threshold: float = ranged(0.7, Real(0.0, 1.0))
    top_n: int = ranged(50, Int(0))  # divergent features listed in report.json
    # feature cards in the report (most divergent + the sparse IRM's features)
    n_cards: int = ranged(24, Int(0))

    def __post_init__(self) -> None:
        check_fields(self, "diff")


@dataclass
class LayersConfig:
    # layers studied, most changed first (at most the model's layers: irmlens.checks)
    top_k: int = ranged(1, SIZE)
    relative: bool = ranged(True, Flag())  # rank by change relative to the base's weights
    # how layers are ranked (irmlens/stages/layers.py: SELECTIONS): "weight_delta", the paper's
    # per-layer weight change; "mediation", the share of the reward gain the layer's output
    # carries (a layer sweep on held-out text before the cache: irmlens/mediate/sweep.py)
    select: str = ranged("weight_delta", OneOf(("weight_delta", "mediation")))

    def __post_init__(self) -> None:
        check_fields(self, "layers")


@dataclass
class CacheConfig:
    # positions per cached row (at most the model's positions: irmlens.checks)
    n_ctx: int = ranged(64, Int(8))
    max_rows: int = ranged(2000, SIZE)
    batch_size: int = ranged(32, SIZE)
    dtype: str = ranged("bfloat16", OneOf(DTYPES))  # bfloat16 | float32 | int8 (per-row scale)
    # the activations cached, and studied: dictionaries are trained on each kind and the IRM is
    # fitted on each; the first is the one the diff, validation and cards read (the paper's:
    # "mlp_out")
    hook_kinds: list[str] = ranged(["resid_post"], Each(OneOf(tuple(HOOK_KINDS)), unique=True))
    shard_rows: int = ranged(256, SIZE)  # token rows per shard

    def __post_init__(self) -> None:
        check_fields(self, "cache")


@dataclass
class WideTopKConfig:
    """``[sae.wide_topk]``: a wider, less sparse shared dictionary for the IRM feature-space
    comparison (real-model studies use 4x-16x beside the paper's L1 at 1x and 2x), trained with
    the ``[sae]`` settings."""

    k: int = ranged(64, Int(0))  # its k (0: no such dictionary; else at most its width)
    multiplier: float = ranged(0.0, Real(0.0, 1024.0))  # width / d_model (0: the widest width)
    architecture: str = ranged("topk", OneOf(("topk", "batchtopk")))

    def __post_init__(self) -> None:
        check_fields(self, "sae.wide_topk")


@dataclass
class DifferenceSAEConfig:
    """``[sae.difference]``: a dictionary trained on the RLHF - base activation *differences* at
    the studied layers (as science-of-finetuning's diffing toolkit does), one of the bases the
    mediate stage compares (``irmlens.bases.linear.DifferenceBasis``); trained with the ``[sae]``
    settings."""

    k: int = ranged(32, Int(0))  # its k (0: no such dictionary; else at most its width)
    multiplier: float = ranged(0.0, Real(0.0, 1024.0))  # width / d_model (0: the widest width)
    architecture: str = ranged("batchtopk", OneOf(("topk", "batchtopk")))

    def __post_init__(self) -> None:
        check_fields(self, "sae.difference")


@dataclass
class CrosscoderStageConfig:
    """``[sae.crosscoder]``: a crosscoder over every cached model at the IRM layer (see
    sae_training/crosscoder.py), beside the shared and paired SAEs: its latents are tagged by
    relative decoder norm and latent scaling (stage diff) and form IRM comparison spaces. Trained
    with ``sae.lr``, ``batch_size``, ``epochs``."""

    architecture: str = ranged("batchtopk", OneOf(("none", *CROSSCODER_ARCHITECTURES)))
    k: int = ranged(32, SIZE)  # at most its width (irmlens.checks)
    multiplier: float = ranged(0.0, Real(0.0, 1024.0))  # width / d_model (0: the widest width)
    l1_coefficient: float = ranged(0.041, POSITIVE)

    def __post_init__(self) -> None:
        check_fields(self, "sae.crosscoder")


@dataclass
class SAEStageConfig:
    """SAEs per model (base, rlhf) and one shared SAE on all models' activations (base, rlhf and
    the null model when there is one), per studied layer and per width (``width_multipliers`` x
    d_model; the paper: 1x and 2x). The IRM uses the widest shared SAE; MMCS compares the
    narrowest and widest dictionary of each model. Sizes that need d_model (k at most the
    narrowest width, ...) are checked in ``irmlens.checks.check_dimensions``."""

    width_multipliers: list[float] = ranged([2, 4], Each(Real(0.0, 1024.0, lo_open=True)))
    architecture: str = ranged("standard", OneOf(ARCHITECTURES))
    l1_coefficient: float = ranged(1.0, POSITIVE)
    k: int = ranged(32, SIZE)  # topk / batchtopk
    lr: float = ranged(1e-3, Real(0.0, 1.0, lo_open=True))
    batch_size: int = ranged(1024, SIZE)
    epochs: float = ranged(4.0, Real(0.0, 10_000.0, lo_open=True))
    n_checkpoints: int = ranged(2, Int(0, 1000))
    ce_eval_rows: int = ranged(64, SIZE)  # token rows used for CE loss recovered
    # Bring your own dictionary: a SAELens SAE folder used as the study's shared dictionary at
    # its hook (which becomes the IRM layer, and is studied whatever the layer ranking says)
    # instead of training one; its width is the study's widest. "" (the default): train one.
    source: str = ranged("", Text())
    # auto | fused | sparse | sae-lens (sae_training.train.SAETrainingConfig)
    trainer: str = ranged("auto", OneOf(TRAINERS))
    # input normalisation of every dictionary: "expected_average_only_in" (scale to norm
    # sqrt(d_in)), "covariance_whitening" (PCA whitening, so low-variance directions, where
    # RLHF's change lies in the tiny default, get features too; see docs/concepts.md) or "none"
    normalize: str = ranged("expected_average_only_in", OneOf(NORMALIZATIONS))
    # the other dictionary kinds, each its own table: [sae.wide_topk], [sae.crosscoder],
    # [sae.difference]
    wide_topk: WideTopKConfig = field(default_factory=lambda: WideTopKConfig())
    difference: DifferenceSAEConfig = field(default_factory=lambda: DifferenceSAEConfig())
    crosscoder: CrosscoderStageConfig = field(default_factory=lambda: CrosscoderStageConfig())

    def __post_init__(self) -> None:
        """The rules that need several of this section's keys: the trainers' own checks, at load;
        and a ``source`` folder that is not a SAELens SAE fails here."""
        check_fields(self, "sae")
        self.training_config(1, 0, "cpu")
        if self.crosscoder.architecture != "none":
            self.crosscoder_config(self.crosscoder.k, 0, "cpu")
        _ = self.source_info

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
            architecture=self.crosscoder.architecture,
            k=self.crosscoder.k,
            l1_coefficient=self.crosscoder.l1_coefficient,
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
class MediateConfig:
    """Where the reward lives (stage ``mediate``, irmlens/mediate/): the layer sweep and every
    basis's faithfulness curves at the studied layers, on cached held-out rows."""

    # cached rows measured on; as many more (disjoint) fit the data-fitted bases (PCA, mean
    # difference), as many more give the prompts of the RLHF model's own completions (fewer
    # cached rows: a third each). 48: the tiny default's stage in about 70 s on a 2-core
    # AVX-512 Xeon (64 rows: 89 s, the layer sweep's shares within 0.02 of 48's;
    # experiments/benchmarks/mediate_cost.py)
    n_rows: int = ranged(48, SIZE)
    recheck: int = ranged(8, Int(0, 1000))  # top components re-ranked by real single patches
    max_k: int = ranged(256, SIZE)  # the curves' largest k (powers of 2 up to it)
    n_bootstrap: int = ranged(1000, Int(10, 1_000_000))
    seed: int = ranged(0, SEED)  # the random rotation's, the random dictionary's, sampling's
    # what the curves and the verdict read (the sweep reports both): the policy's expected
    # next-token utility under the reward model, or its implicit reward on lexicon words
    metric: str = ranged("expected_utility", OneOf(("expected_utility", "implicit_reward")))
    # the RLHF model's own completions (the second text set): prompts of this many tokens cut
    # from cached rows disjoint from the measured and fitted ones, completions as long as RLHF's
    prompt_tokens: int = ranged(8, SIZE)
    # beside the registry's dictionaries (the widest shared and base SAEs), every width of the
    # shared, base and RLHF SAEs: each adds a curve (about 40 passes of the model from the layer)
    every_width: bool = ranged(False, Flag())
    # the sweep also patches each block's MLP output where the cache has mlp_out (twice the
    # sweep's passes: off for a 30-layer model on 2 cores)
    mlp_out: bool = ranged(True, Flag())

    def __post_init__(self) -> None:
        check_fields(self, "mediate")


@dataclass
class ValidateConfig:
    """The causal validation (stage ``validate``): feature sets ablated in the RLHF model and
    steered into the base model, scored on held-out prompts (see irmlens/stages/validate.py)."""

    # held-out prompts, the same for every arm (a bootstrap needs two)
    n_prompts: int = ranged(256, Int(2))
    # prompt choice and sampling: one seed for every arm, so arms pair up
    seed: int = ranged(0, SEED)
    steering_scales: list[float] = ranged([0.5, 1.0, 2.0], Each(Real(-100.0, 100.0)))
    n_random_draws: int = ranged(5, Int(1, 100))  # matched random feature sets
    n_bootstrap: int = ranged(1000, Int(10, 1_000_000))
    perplexity_texts: int = ranged(64, SIZE)  # held-out reviews whose perplexity each arm reports
    # the paper's number: continuations of prefixes this long
    paper_prefix_words: int = ranged(5, SIZE)
    # each sparse-IRM feature ablated alone (for its card), on the first this many prompts
    single_feature_effects: bool = ranged(True, Flag())
    single_feature_prompts: int = ranged(64, Int(2))
    # the sparse crosscoder IRM's latents ablated (other models run in lockstep) and steered,
    # beside matched random latents (needs sae.crosscoder)
    crosscoder: bool = ranged(True, Flag())

    def __post_init__(self) -> None:
        check_fields(self, "validate")


@dataclass
class LabelsConfig:
    """Reward-relevance labels of features (stage ``labels``, irmlens/labels/)."""

    # lexicon labeler: share of activation on lexicon words, |activation-weighted mean utility|
    min_mass: float = ranged(0.25, Real(0.0, 1.0))
    min_utility: float = ranged(0.5, NONNEGATIVE)
    # the LLM labeler on the sparse IRM's features: "none", "local" (an HF chat model folder in
    # llm_model; "smollm2": SmolLM2-135M-Instruct, offline) or "openai" (IRMLENS_LLM_* env)
    llm: str = ranged("local", OneOf(("none", "local", "openai")))
    llm_model: str = ranged("smollm2", Text(nonempty=True))
    n_contexts: int = ranged(8, Int(1, 100))  # top contexts shown per feature
    # what the LLM is told the reward model rewards (empty: a sentence made from the lexicon)
    reward_description: str = ranged("", Text())

    def __post_init__(self) -> None:
        check_fields(self, "labels")


@dataclass
class StudyConfig:
    name: str = ranged("study", Name())
    seed: int = ranged(0, SEED)
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
    mediate: MediateConfig = field(default_factory=MediateConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)

    def __post_init__(self) -> None:
        from irmlens.checks import check_study

        check_fields(self, "")
        check_study(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The allowed value of every key, read off the sections' fields (``irmlens.ranges.ranged``): each
# section checks its values against them as it is built (``check_fields``, which the loader turns
# into a ConfigError), so a bad value fails naming the key, the value and what would do. tests/test_config.py checks that every key
# has one. The rules that need more than one key: ``irmlens.checks``.
RANGES: dict[str, Rule] = field_rules(StudyConfig)

# Bounds on the work a new run would do (``ranged(..., new_run=(rule, why))``), checked when a
# config is loaded to run, not when a finished run's config is read back, so that a run made before
# a bound existed still reports (``irmlens.checks.check_new_run``).
NEW_RUN_LIMITS: dict[str, tuple[Rule, str]] = field_rules(StudyConfig, what="new_run")


# Keys irmlens no longer reads: a config (or a run folder's config.toml) that has one still loads,
# with a warning saying why it is ignored.
# Keys that moved (flat [sae] keys into their dictionary kind's table): a config (or a finished
# run's config.toml) that spells one the old way still loads, with a warning naming the new key.
RENAMED_KEYS = {
    "sae.wide_topk_k": "sae.wide_topk.k",
    "sae.wide_topk_multiplier": "sae.wide_topk.multiplier",
    "sae.wide_topk_architecture": "sae.wide_topk.architecture",
    "sae.crosscoder_k": "sae.crosscoder.k",
    "sae.crosscoder_multiplier": "sae.crosscoder.multiplier",
    "sae.crosscoder_l1_coefficient": "sae.crosscoder.l1_coefficient",
}

REMOVED_KEYS = {
    "pretrain.time_budget_s": "pretraining runs exactly pretrain.max_steps steps on every machine "
    "(a wall-clock budget made the model depend on the machine's speed)",
}


def _renamed(values: dict[str, Any], where: str) -> dict[str, Any]:
    """``values`` with keys that moved (``RENAMED_KEYS``) put where they live now, each with a
    warning; ``sae.crosscoder = "<architecture>"`` becomes ``[sae.crosscoder] architecture``."""
    import warnings

    values = dict(values)
    if where == "sae." and isinstance(values.get("crosscoder"), str):
        warnings.warn(
            'config key sae.crosscoder = "..." is now sae.crosscoder.architecture '
            "(a [sae.crosscoder] table)",
            stacklevel=3,
        )
        values["crosscoder"] = {"architecture": values["crosscoder"]}
    for old, new in RENAMED_KEYS.items():
        section, name = old.rsplit(".", 1)
        if f"{section}." != where or name not in values:
            continue
        warnings.warn(f"config key {old} is now {new}", stacklevel=3)
        table, key = new[len(where) :].split(".")
        sub = values.get(table, {})
        if not isinstance(sub, dict):
            raise ConfigError(f"[{where}{table}] must be a table")
        if key in sub:
            raise ConfigError(f"{old} and {new} both given: keep {new}")
        values[table] = {**sub, key: values.pop(name)}  # a copy: the caller's dict is kept
    return values


def same_study_respelled(text: str, cfg: StudyConfig) -> bool:
    """Is ``text`` (a run folder's config.toml) ``cfg`` written with keys that have since moved
    (``RENAMED_KEYS``)? Only when it spells out every key this version has, so that a run made
    before a key existed (whose default might not be what it ran with) is not taken for it."""
    import warnings

    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return False

    def leaves(d: dict, where: str = "") -> set[str]:
        out = set()
        for k, v in d.items():
            key = RENAMED_KEYS.get(f"{where}{k}", f"{where}{k}")
            if key == "sae.crosscoder" and isinstance(v, str):
                key = "sae.crosscoder.architecture"
            out |= leaves(v, f"{key}.") if isinstance(v, dict) else {key}
        return out

    if leaves(values) - set(REMOVED_KEYS) != set(RANGES):
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return config_from_dict(values, check_device=False, new_run=False) == cfg
        except ConfigError:
            return False


def _build(cls, values: dict[str, Any], where: str):
    values = _renamed(values, where)
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
            kwargs[k] = v
    try:  # the section checks each key's rule, then its rules of several keys (__post_init__)
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
        WideTopKConfig,
        DifferenceSAEConfig,
        CrosscoderStageConfig,
        DiffConfig,
        IRMConfig,
        MediateConfig,
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
    from irmlens.checks import check_device_exists, check_new_run, check_reporter_installed

    cfg = _build(StudyConfig, values, "")
    if check_device:
        check_device_exists(cfg)
        check_reporter_installed(cfg)
    if new_run:
        check_new_run(cfg)
    return cfg


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
    lines: list[str] = []

    def table(name: str, d: dict) -> None:
        lines.extend(
            (["", f"[{name}]"] if name else [])
            + [f"{k} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, dict)]
        )
        for k, v in d.items():
            if isinstance(v, dict):
                table(f"{name}.{k}" if name else k, v)

    table("", cfg.to_dict())
    return "\n".join(lines) + "\n"

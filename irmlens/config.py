"""The study config: small typed dataclasses, loaded from TOML with strict key checking."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from irmlens.errors import ConfigError
from irmlens.irm.fit import IRMConfig
from irmlens.models.pretrain import PretrainConfig
from irmlens.rlhf.train import RLHFConfig
from sae_training.train import SAETrainingConfig


@dataclass
class DataConfig:
    lexicon: str = "vader"  # "vader" (the cached VADER lexicon) or a path to word<TAB>utility lines
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
    hook_kinds: list[str] = field(default_factory=lambda: ["resid_post"])  # and/or "mlp_out"
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
    trainer: str = "auto"  # auto | fused | sae-lens (see sae_training.train.SAETrainingConfig)
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
        if self.wide_topk_k < 0:
            raise ValueError(f"sae.wide_topk_k = {self.wide_topk_k}: use 0 (none) or a k >= 1")
        self.training_config(1, 0, "cpu")  # the same checks as the trainer's, at load time

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

    def __post_init__(self) -> None:
        """The rules that need more than one section, checked at load so that a config which
        cannot finish fails before hours of compute, naming the key and the fix."""
        space, top_k = self.irm.space, self.layers.top_k
        if top_k < 1:
            raise ValueError(f"layers.top_k = {top_k}: study at least one layer (1 or more)")
        if self.model.base == "tiny" and top_k > self.pretrain.n_layer:
            raise ValueError(
                f"layers.top_k = {top_k} but the tiny model has pretrain.n_layer = "
                f"{self.pretrain.n_layer} layers: lower layers.top_k"
            )
        if space != "auto":
            from irmlens.irm.spaces import SPACES

            problem = SPACES[space].unmet(self)
            if problem:
                raise ValueError(f"irm.space = {space!r} {problem}, or choose another irm.space")
        if "resid_post" not in self.cache.hook_kinds:
            raise ValueError(
                f"cache.hook_kinds = {self.cache.hook_kinds}: the SAE, diff and IRM stages read "
                "the residual stream, so it must include 'resid_post' (add 'mlp_out' beside it "
                "to cache MLP outputs too, e.g. ['resid_post', 'mlp_out'])"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
            kwargs[k] = v
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid value in [{where.rstrip('.') or 'top level'}]: {e}") from None


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
    )
}


def config_from_dict(values: dict[str, Any]) -> StudyConfig:
    return _build(StudyConfig, values, "")


def load_config(path: str | Path) -> StudyConfig:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist (try experiments/configs/tiny.toml)")
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    values.setdefault("name", path.stem)
    return config_from_dict(values)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
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

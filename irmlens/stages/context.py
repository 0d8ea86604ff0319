"""What every stage of a study shares, computed once: the config's assets, reward model and
splits, the model pair, the studied layers, d_model and the dictionary widths.

A value that an earlier stage wrote is read back from its file (through ``RunPaths``), so a stage
works the same whether the earlier ones ran in this process or in an earlier, killed one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from irmlens.config import StudyConfig
from irmlens.io import read_json
from irmlens.run import RunPaths, read_model_dirs


def log(msg: str) -> None:
    print(f"[irmlens {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class HookedPair:
    """Loads the study's models (base, rlhf, and the null model if any) as HookedTransformers on
    first use (stages that skip never pay)."""

    def __init__(self, cfg: StudyConfig, dirs: dict[str, Path]) -> None:
        self.cfg, self.dirs = cfg, dict(dirs)
        self._models: dict | None = None
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(
                self.dirs["base"], trust_remote_code=self.cfg.model.trust_remote_code
            )
        return self._tokenizer

    def get(self) -> dict:
        if self._models is None:
            from irmlens.models.hooked import load_hf_model, load_hooked_model
            from irmlens.models.pair import check_pair_configs

            self._models = {}
            for name, d in self.dirs.items():
                trust = self.cfg.model.trust_remote_code
                hf, tok = load_hf_model(d, self.cfg.model.device, trust)
                if self._tokenizer is None:
                    self._tokenizer = tok
                self._models[name] = load_hooked_model(
                    d, self.cfg.model.device, hf_model=hf, tokenizer=tok, trust_remote_code=trust
                )
            for name in self._models:
                if name != "base":
                    check_pair_configs(self._models["base"].cfg, self._models[name].cfg)
        return self._models


# the folder name (under saes/) of the dictionary trained on RLHF - base differences
DIFFERENCE_LABEL = "difference"


@dataclass
class StudyContext:
    """One study run: its config, its folder, the stages forced to recompute, and the values
    the stages share (each computed on first use)."""

    cfg: StudyConfig
    paths: RunPaths
    force: frozenset[str] = frozenset()
    # set by the models stage: the base model's folder, and models given in the config
    base_dir: Path | None = None
    given: dict[str, Path] = field(default_factory=dict)
    _saes: dict = field(default_factory=dict, repr=False)

    def forced(self, stage: str) -> bool:
        return stage in self.force

    @cached_property
    def assets(self):
        from irmlens.data.assets import fetch_assets

        return fetch_assets(log=log)

    @cached_property
    def rm(self):
        """The reward model of ``data.lexicon`` (the true reward the IRM is scored against; with
        ``"none"``, the implicit-reward lexicon of stage ``target``, from its stage on)."""
        from irmlens.rewards.lexicon import LexiconRewardModel

        if self.cfg.data.lexicon == "none":  # RM-free: the pair's own implicit reward
            from irmlens.rewards.implicit import implicit_reward_model

            table = self.paths.target / "implicit_reward.tsv"  # stage target's table
            return implicit_reward_model(table, self.cfg.data.implicit_min_count)
        if self.cfg.data.lexicon == "vader":
            return LexiconRewardModel.from_file(self.assets.lexicon, name="vader")
        return LexiconRewardModel.from_file(self.cfg.data.lexicon)

    @cached_property
    def splits(self):
        from irmlens.data.corpus import load_reviews, split_reviews

        d = self.cfg.data
        return split_reviews(load_reviews(self.assets.reviews), d.n_validation, d.n_heldout, d.seed)

    @cached_property
    def dirs(self) -> dict[str, Path]:
        """The model folders of the pair, as the pair stage recorded them."""
        return read_model_dirs(self.paths.root)

    @cached_property
    def pair(self) -> HookedPair:
        return HookedPair(self.cfg, self.dirs)

    @cached_property
    def layers(self) -> dict:
        """``diff/layers.json``: per-layer divergence, the ranking and the studied layers."""
        return read_json(self.paths.diff / "layers.json")

    @property
    def studied_layers(self) -> list[int]:
        return self.layers["studied_layers"]

    @property
    def irm_layer(self) -> int:
        """The most changed of the studied layers: the IRM's, the feature table's (with
        ``sae.source``, the source dictionary's layer)."""
        src = self.cfg.sae.source_info
        if src is not None:
            return src.layer
        return next(la for la in self.layers["ranking"] if la in self.studied_layers)

    @property
    def hook_kind(self) -> str:
        """The activations the dictionaries, diff, IRM, validation and cards study: the first of
        ``cache.hook_kinds`` (the IRM is also fitted on each other kind: ``irm/metrics.json``
        ``hook_kinds``)."""
        return self.cfg.cache.hook_kinds[0]

    def hook(self, layer: int, kind: str | None = None) -> str:
        """The cache's hook name of ``layer`` for ``kind`` (default: the studied kind)."""
        from irmlens.cache.store import hook_name

        return hook_name(layer, kind or self.hook_kind)

    def activations(self, model: str, layer: int, kind: str | None = None):
        """The cache's activations of ``model`` at ``layer`` (and hook kind ``kind``)."""
        from irmlens.cache.store import load_activations

        return load_activations(self.paths.cache, model, self.hook(layer, kind))

    def hf_model(self, name: str) -> tuple:
        """The pair's model ``name`` as an HF causal LM in eval mode, with its tokenizer."""
        from irmlens.models.hooked import load_hf_model

        m = self.cfg.model
        model, tokenizer = load_hf_model(self.dirs[name], m.device, m.trust_remote_code)
        return model.eval(), tokenizer

    @cached_property
    def d_model(self) -> int:
        from irmlens.cache.store import load_manifest

        return next(iter(load_manifest(self.paths.cache)["shapes"].values()))[1]

    @property
    def widths(self) -> list[int]:
        """Dictionary widths, narrowest first (``sae.width_multipliers`` x d_model, and the
        ``sae.source`` dictionary's width, the widest: the config's checks make sure)."""
        widths = {int(m * self.d_model) for m in self.cfg.sae.width_multipliers}
        src = self.cfg.sae.source_info
        return sorted(widths | ({src.d_sae} if src is not None else set()))

    @property
    def widest(self) -> int:
        """The width of the dictionaries the diff, IRM and cards stages read."""
        return self.widths[-1]

    @property
    def wide_topk_width(self) -> int:
        """The wide TopK dictionary's width (``sae.wide_topk.multiplier`` x d_model, or the
        widest width)."""
        return self._width_or_widest(self.cfg.sae.wide_topk.multiplier)

    @property
    def crosscoder_width(self) -> int:
        """The crosscoder's width (``sae.crosscoder.multiplier`` x d_model, or the widest)."""
        return self._width_or_widest(self.cfg.sae.crosscoder.multiplier)

    def _width_or_widest(self, multiplier: float) -> int:
        """``multiplier`` x d_model, or (0) the widest dictionary width."""
        return int(multiplier * self.d_model) if multiplier else self.widest

    @property
    def crosscoder_dir(self) -> Path:
        """``saes/crosscoder/<IRM hook>/<width>/``: the crosscoder over every cached model."""
        return self.paths.sae_dir("crosscoder", self.hook(self.irm_layer), self.crosscoder_width)

    @property
    def difference_width(self) -> int:
        """The difference dictionary's width (``sae.difference.multiplier`` x d_model, or the
        widest)."""
        return self._width_or_widest(self.cfg.sae.difference.multiplier)

    def width_of(self, label: str) -> int:
        """The width of the dictionary ``label`` the diff, IRM, mediation and cards read."""
        if label == self.wide_topk_label:
            return self.wide_topk_width
        return self.difference_width if label == DIFFERENCE_LABEL else self.widest

    def dictionary(self, label: str, layer: int, kind: str | None = None) -> tuple[object, Path]:
        """The dictionary ``saes/<label>/<hook of layer and kind>/`` the study reads (label:
        shared, base, rlhf at the widest width, or the wide TopK's folder at its own) with its
        folder (``irmlens.bases.BasisSource``): the studied kind's loaded once and kept (the
        stages share them), another kind's loaded afresh. ``NoDictionaryError``: none there."""
        from irmlens.bases import NoDictionaryError
        from sae_training.train import load_sae

        kind = kind or self.hook_kind
        key = (label, layer, kind)
        if key in self._saes:
            return self._saes[key]
        folder = self.paths.sae_dir(label, self.hook(layer, kind), self.width_of(label))
        if not folder.exists():
            raise NoDictionaryError(f"no dictionary {label!r} at {folder}")
        found = (load_sae(folder), folder)
        if kind == self.hook_kind:
            self._saes[key] = found
        return found

    def set_inputs(self, bench):
        """What the validation's set builders read (``irmlens.validate.sets.SetInputs``): the
        dictionaries a feature reference cites, and their random stand-ins, come through the
        basis registry (``sae``, ``random_sae``). The validate stage intervenes on the sets; the
        mediate stage places them on its curves' axes."""
        from irmlens.io import read_json
        from irmlens.validate.sets import SetInputs

        irm = read_json(self.paths.irm_metrics)
        features = read_json(self.paths.features_json)["divergent_features"]
        return SetInputs(
            irm,
            [f["feature"] for f in features],
            sorted(self.studied_layers),
            self.irm_layer,
            self.sae,
            self.random_sae,
            self.rm.word_utility,
            self.cfg.validate,
            bench,
        )

    def sae(self, label: str, layer: int):
        """The basis a feature reference cites as ``label`` at ``layer`` of the studied hook kind,
        resolved through the basis registry (``irmlens.bases.cited_basis``)."""
        from irmlens.bases import cited_basis

        return cited_basis(self, label, layer)

    def crosscoder_views(self, kind: str | None = None) -> dict:
        """The crosscoder's readings of the RLHF change (``irmlens.bases.BasisSource``): all its
        latents, and (when it has any) the live latents stage diff tagged RLHF-only (relative
        decoder norm >= 0.9); empty when the study has no crosscoder."""
        from sae_training.crosscoder import CrosscoderReading, load_crosscoder

        diff_file = self.paths.diff / "crosscoder.json"
        if not diff_file.exists():
            return {}
        key = ("crosscoder", kind or self.hook_kind)
        if key not in self._saes:
            folder = self.crosscoder_dir
            cc, ccfg = load_crosscoder(folder)
            views = {"crosscoder": [(CrosscoderReading(cc, ccfg["models"]), folder)]}
            rlhf_only = read_json(diff_file)["pairs"]["rlhf"]["tuned_only_latents"]
            if rlhf_only:
                reading = CrosscoderReading(cc, ccfg["models"], rlhf_only)
                views["crosscoder_rlhf_only"] = [(reading, folder)]
            self._saes[key] = views
        return self._saes[key]

    def random_sae(self, label: str, layer: int, seed: int):
        """The IRM's random control standing in for ``sae(label, layer)`` (its basis kind's
        random stand-in), rebuilt from the seed its stage recorded (``random_seed`` of its
        feature refs), built once."""
        from irmlens.bases import cited_basis

        key = (label, layer, seed)
        if key not in self._saes:
            self._saes[key] = cited_basis(self, label, layer, seed)
        return self._saes[key]

    @property
    def wide_topk_label(self) -> str:
        """The folder name (under ``saes/``) of the wide TopK dictionary."""
        return f"shared-{self.cfg.sae.wide_topk.architecture}{self.cfg.sae.wide_topk.k}"

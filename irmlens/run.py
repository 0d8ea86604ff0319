"""The run folder: where each stage's files live (``RunPaths``), which folders may become one
(``check_out_folder``) and who may write them (``run_lock``, from ``irmlens.lock``).

Every command that writes into a run folder holds its lock for as long as it writes, so two
``irmlens run`` (or ``rlhf``, ``irm``, ``report``) on one folder cannot interleave their steps.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from irmlens.errors import ConfigError, UnverifiedRunError
from irmlens.lock import LOCK_FILENAME, run_lock  # noqa: F401 (the run folder's lock, re-exported)
from irmlens.records import RECORDS_DIR

ADOPTING = ".adopting"  # in .records/ while `irmlens adopt` writes them (irmlens.adopt)


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def lock(self) -> Path:
        return self.root / LOCK_FILENAME

    @property
    def rlhf_model(self) -> Path:
        return self.root / "models" / "rlhf"

    @property
    def null_model(self) -> Path:
        return self.root / "models" / "null"

    @property
    def null_rlhf(self) -> Path:
        return self.root / "rlhf-null"

    @property
    def pair_json(self) -> Path:
        return self.root / "models" / "pair.json"

    @property
    def rlhf(self) -> Path:
        return self.root / "rlhf"

    @property
    def diff(self) -> Path:
        return self.root / "diff"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def saes(self) -> Path:
        return self.root / "saes"

    @property
    def target(self) -> Path:
        return self.root / "target"

    @property
    def irm(self) -> Path:
        return self.root / "irm"

    @property
    def mediate(self) -> Path:
        return self.root / "mediate"

    @property
    def validate(self) -> Path:
        return self.root / "validate"

    @property
    def labels(self) -> Path:
        return self.root / "labels"

    @property
    def llm_label_cache(self) -> Path:
        """The LLM labeler's answers, one file per prompt: outside ``labels/`` (which is
        replaced in one rename) so that a killed labelling run resumes."""
        return self.root / "labels-llm-cache"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def cards(self) -> Path:
        return self.diff / "cards.json"

    def features_table(self, layer: int) -> Path:
        return self.diff / f"features_layer{layer}.csv"

    def matching_file(self, layer: int) -> Path:
        return self.diff / f"matching_layer{layer}.json"

    def sae_dir(self, model: str, hook: str, width: int) -> Path:
        return self.saes / model / hook / str(width)

    @property
    def model_dirs(self) -> Path:
        return self.root / "models" / "dirs.json"

    @property
    def rlhf_summary(self) -> Path:
        return self.rlhf / "summary.json"

    @property
    def null_summary(self) -> Path:
        return self.null_rlhf / "summary.json"

    @property
    def rlhf_metrics(self) -> Path:
        return self.rlhf / "metrics.jsonl"

    @property
    def layers_json(self) -> Path:
        return self.diff / "layers.json"

    @property
    def features_json(self) -> Path:
        return self.diff / "features.json"

    @property
    def mmcs(self) -> Path:
        return self.saes / "mmcs.json"

    @property
    def irm_metrics(self) -> Path:
        return self.irm / "metrics.json"

    @property
    def irm_coefficients(self) -> Path:
        return self.irm / "coefficients.safetensors"

    @property
    def word_attribution(self) -> Path:
        return self.irm / "word_attribution.json"

    @property
    def word_utilities(self) -> Path:
        return self.irm / "word_utilities.csv"

    @property
    def report_json(self) -> Path:
        return self.report / "report.json"


def write_model_dirs(run_dir: Path, dirs: dict[str, Path]) -> None:
    """``models/dirs.json``: where each model of the pair is. Folders inside the run folder are
    stored relative to it and others absolute, so the run can be moved and read from any
    working directory (``irmlens report`` reloads the models)."""
    root = Path(run_dir).resolve()
    out = {}
    for name, d in dirs.items():
        d = Path(d).resolve()
        out[name] = str(d.relative_to(root)) if d.is_relative_to(root) else str(d)
    from irmlens.io import atomic_write_json

    atomic_write_json(Path(run_dir) / "models" / "dirs.json", out)


def read_model_dirs(run_dir: Path) -> dict[str, Path]:
    """The model folders ``write_model_dirs`` recorded, as paths usable from here."""

    def resolve(d: str) -> Path:
        if Path(d).is_absolute():
            return Path(d)
        inside = Path(run_dir) / d
        # runs written before 2026-11-27 stored paths relative to the working directory
        return inside if inside.exists() or not Path(d).exists() else Path(d)

    from irmlens.io import read_json

    return {
        name: resolve(d) for name, d in read_json(Path(run_dir) / "models" / "dirs.json").items()
    }


def claim_run_dir(paths: RunPaths, cfg) -> None:
    """Record ``cfg`` as the run folder's config, refusing a folder that holds a different study.
    The comparison is on the resolved config text, so a run written by an irmlens with other
    settings or defaults is refused too: its outputs may come from another recipe (base model,
    null pair, dictionaries). A ``config.toml`` damaged since it was written (its record says
    what it held) is rewritten when ``cfg`` is the config it recorded."""
    import hashlib

    from irmlens.config import dump_config
    from irmlens.errors import ConfigError
    from irmlens.io import atomic_write_text
    from irmlens.records import damaged_files, read_record, record_path, write_record

    cfg_text = dump_config(cfg)
    if paths.config.exists():
        same = paths.config.read_bytes() == cfg_text.encode("utf-8")
        if not same:  # the same study, written before some keys moved: rewritten below
            from irmlens.config import same_study_respelled

            same = same_study_respelled(paths.config.read_text(encoding="utf-8-sig"), cfg)
        rec = read_record(paths.root, "config")
        entry = rec["files"].get("config.toml") if rec is not None else None
        recorded = entry.get("sha256") if isinstance(entry, dict) else None
        if recorded is not None and damaged_files(paths.root, rec):
            if recorded != hashlib.sha256(cfg_text.encode("utf-8")).hexdigest():
                raise ConfigError(
                    f"{paths.config} has changed since the run was made (its sha256 differs from "
                    f"{record_path(paths.root, 'config')}), and this config is not the one it "
                    "recorded. Run again with the config this run was made with, which rewrites "
                    "it, or choose another --out folder."
                )
            same = True  # the damaged file held exactly this config: write it again
        if not same:
            raise ConfigError(
                f"{paths.root} already holds a run with a different config ({paths.config}), or "
                "one written by another irmlens version. Choose another --out folder, or delete "
                "that one to start over."
            )
    paths.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(paths.config, cfg_text)
    write_record(paths.root, "config", [paths.config])


def read_run_config(paths: RunPaths):
    """The config a finished run was made with (its ``config.toml``), verified against its
    record; a damaged or unreadable one is named with the fix."""
    from irmlens.config import load_config
    from irmlens.errors import ConfigError, DamagedFileError
    from irmlens.records import verify_stage

    if not paths.config.exists():
        raise ConfigError(
            f"{paths.root} is not an irmlens run folder (no config.toml); run "
            f"`irmlens run CONFIG --out {paths.root}` first"
        )
    verify_stage(paths.root, "config", required=False)  # runs made before records have none
    try:
        tomllib.loads(paths.config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise DamagedFileError(
            f"{paths.config}, the run's config, cannot be read ({e}). Restore it: run "
            f"`irmlens run YOUR_CONFIG --out {paths.root}` with the config the run was made with"
        ) from None
    # readable: a value refused now (a rule newer than the run) is a ConfigError saying so
    return load_config(paths.config, check_device=False, new_run=False)


def is_run_folder(root: Path) -> bool:
    """Whether ``root`` holds an irmlens run: its config, or its completion records."""
    root = Path(root)
    return (root / "config.toml").is_file() or (root / RECORDS_DIR).is_dir()


def check_out_folder(root: Path) -> None:
    """Refuse an ``--out`` irmlens must not write into: a file; a non-empty folder that is not a
    run folder (its stages replace their folders whole, so a user's ``report/`` or ``irm/`` would be
    lost); a run folder without completion records (made by an irmlens before records, or copied
    without its dot-folders), whose files cannot be verified until ``irmlens adopt`` records them."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--out {root} is a file, not a folder: name a run folder")
    if not root.is_dir():
        return
    if not is_run_folder(root):
        found = sorted(p.name for p in root.iterdir() if p.name != LOCK_FILENAME)
        if found:
            shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
            raise ConfigError(
                f"--out {root} is a non-empty folder that is not an irmlens run folder (it holds "
                f"{shown}, and no config.toml): irmlens replaces its stages' folders whole, so files "
                "there would be lost. Give a new or empty folder."
            )
        return
    check_records_exist(root)


def check_records_exist(root: Path) -> None:
    """Refuse a run folder without completion records (``UnverifiedRunError`` with the fix)."""
    root = Path(root)
    if (root / RECORDS_DIR / ADOPTING).exists():
        raise UnverifiedRunError(
            f"{root}: an `irmlens adopt` was interrupted, so its records are partial. Run "
            f"`irmlens adopt {root}` again (it starts over)."
        )
    if (root / "config.toml").is_file() and not (root / RECORDS_DIR).is_dir():
        others = [p.name for p in root.iterdir() if p.name not in ("config.toml", LOCK_FILENAME)]
        if not others:  # a config kept in the folder it names, not a run
            raise ConfigError(
                f"{root} holds a config.toml and nothing else: irmlens writes the run's resolved "
                f"config there, which would replace yours. Keep your config outside the run "
                f"folder (e.g. `mv {root / 'config.toml'} {root.name}.toml`) and run it with "
                f"--out {root}"
            )
        raise UnverifiedRunError(
            f"{root} has no completion records ({root / RECORDS_DIR} is missing: a run made by an "
            "irmlens before records, or a copy that left out dot-folders), so nothing in it can be "
            f"verified. `irmlens adopt {root}` checks what can be checked, says what it could not, "
            "and records the files as they are now; or give a new --out folder."
        )

"""Where irmlens keeps downloaded assets and pretrained models (never inside the git tree)."""

from __future__ import annotations

import os
from pathlib import Path


def irmlens_home() -> Path:
    """Cache root: ``$IRMLENS_HOME`` if set, else ``~/.cache/irmlens``."""
    env = os.environ.get("IRMLENS_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "irmlens"


def data_dir() -> Path:
    return irmlens_home() / "data"


def models_dir() -> Path:
    return irmlens_home() / "models"

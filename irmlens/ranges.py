"""Allowed values of one config key: each rule says whether a value fits, how to describe what
does (for the error's fix), and which values sit on its edges (for the loader's fuzz test).

Each key's rule sits beside its field (``ranged``), in the section's dataclass;
``irmlens.config.RANGES`` is derived from the fields (``field_rules``), and the loader checks every
value against it before any section is built, so a bad value fails at load naming the key, the
value and what would do, instead of minutes into a stage. Rules that need more than one key are in
``irmlens.checks``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

# 2**31 - 1: sizes above this overflow torch's 32-bit index paths long before they would finish
MAX_SIZE = 2**31 - 1
# numpy's and torch's seeds both accept 0 .. 2**32 - 1
MAX_SEED = 2**32 - 1


class Rule:
    def problem(self, value: Any) -> str | None:
        """None if ``value`` fits, else what is wrong and what would do."""
        raise NotImplementedError

    def edges(self) -> list[Any]:
        """Values just inside the range (each must pass ``problem``)."""
        return []


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


@dataclass(frozen=True)
class Int(Rule):
    lo: int = 0
    hi: int = MAX_SIZE

    def describe(self) -> str:
        if self.hi == MAX_SIZE:
            return f"an integer, {self.lo} or more"
        return f"an integer from {self.lo} to {self.hi}"

    def problem(self, value: Any) -> str | None:
        bad = not isinstance(value, int) or isinstance(value, bool)
        return f"must be {self.describe()}" if bad or not self.lo <= value <= self.hi else None

    def edges(self) -> list[Any]:
        return [self.lo, self.lo + 1]


@dataclass(frozen=True)
class Real(Rule):
    """A finite number in [lo, hi], with either end open."""

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False

    def describe(self) -> str:
        parts = []
        if self.lo > -math.inf:
            parts.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
        if self.hi < math.inf:
            parts.append(f"{'<' if self.hi_open else '<='} {self.hi:g}")
        return "a finite number" + (" " + " and ".join(parts) if parts else "")

    def problem(self, value: Any) -> str | None:
        # an int is finite however large (math.isfinite would overflow on 10**400)
        if not _is_number(value) or (isinstance(value, float) and not math.isfinite(value)):
            return f"must be {self.describe()}"
        below = value < self.lo or (self.lo_open and value == self.lo)
        above = value > self.hi or (self.hi_open and value == self.hi)
        return f"must be {self.describe()}" if below or above else None

    def edges(self) -> list[Any]:
        out = []
        for end, is_open, step in ((self.lo, self.lo_open, 1), (self.hi, self.hi_open, -1)):
            if math.isfinite(end):
                out.append(end + step * max(abs(end) * 1e-6, 1e-6) if is_open else end)
        return out or [0.0]


@dataclass(frozen=True)
class OneOf(Rule):
    options: tuple

    def problem(self, value: Any) -> str | None:
        if value not in self.options or type(value) is not type(self.options[0]):
            return f"must be one of {', '.join(repr(o) for o in self.options)}"
        return None

    def edges(self) -> list[Any]:
        return list(self.options)


@dataclass(frozen=True)
class Flag(Rule):
    def problem(self, value: Any) -> str | None:
        return None if isinstance(value, bool) else "must be true or false"

    def edges(self) -> list[Any]:
        return [True, False]


@dataclass(frozen=True)
class Text(Rule):
    """Any single-line string (a path, a model name), optionally non-empty."""

    nonempty: bool = False

    def problem(self, value: Any) -> str | None:
        if not isinstance(value, str):
            return "must be a string"
        if self.nonempty and not value.strip():
            return "must not be empty"
        if "\x00" in value or "\n" in value:
            return "must be one line without NUL characters"
        return None

    def edges(self) -> list[Any]:
        return []  # paths and model names: their meaning is checked where they are resolved


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


@dataclass(frozen=True)
class Name(Rule):
    """One safe path component: the run folder is ``runs/<name>``, so ``../x`` or ``/x`` would
    write outside ``runs/``."""

    def problem(self, value: Any) -> str | None:
        if not isinstance(value, str) or not _SAFE_NAME.fullmatch(value) or ".." in value:
            return (
                "must be one folder name: letters, digits, '.', '_' or '-', starting with a "
                "letter or digit, at most 100 characters, no '..' (e.g. \"tiny-study\")"
            )
        return None

    def edges(self) -> list[Any]:
        return ["a", "study-1.b_c"]


_DEVICE = re.compile(r"(cpu|mps|cuda)(:\d+)?")


@dataclass(frozen=True)
class Device(Rule):
    """A torch device string; whether this machine has it is ``device_problem``'s question."""

    def problem(self, value: Any) -> str | None:
        if not isinstance(value, str) or not _DEVICE.fullmatch(value):
            return 'must be a torch device: "cpu", "cuda", "cuda:N" or "mps"'
        return None

    def edges(self) -> list[Any]:
        return ["cpu"]


def device_problem(device: str) -> str | None:
    """None if this machine has ``device``, else why not (checked where a study runs: a finished
    run's config names the device it ran on, which need not exist where it is read)."""
    import torch

    kind, _, index = device.partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            return 'this machine has no CUDA GPU (torch.cuda.is_available() is False): use "cpu"'
        if index and int(index) >= torch.cuda.device_count():
            return f"this machine has {torch.cuda.device_count()} CUDA device(s)"
    if kind == "mps" and not torch.backends.mps.is_available():
        return 'this machine has no MPS device: use "cpu"'
    return None


@dataclass(frozen=True)
class Each(Rule):
    """A list whose every item fits ``item`` (and at least ``min_len`` of them)."""

    item: Rule
    min_len: int = 1
    unique: bool = False

    def problem(self, value: Any) -> str | None:
        if not isinstance(value, list) or len(value) < self.min_len:
            return f"must be a list of at least {self.min_len} item(s)"
        for x in value:
            p = self.item.problem(x)
            if p:
                return f"item {x!r} {p}"
        if self.unique and len({repr(x) for x in value}) < len(value):
            return "must not repeat an item"
        return None

    def edges(self) -> list[Any]:
        return [[e] for e in self.item.edges()]


# ------------------------------------------------------------------ rules beside their fields


def ranged(default: Any, rule: Rule, *, new_run: tuple[Rule, str] | None = None) -> Any:
    """A config field with its allowed values beside it: ``x: int = ranged(5, SIZE)``.
    ``new_run``: a tighter rule (and why) for a config about to run, not for a finished run's
    config read back (``irmlens.checks.check_new_run``)."""
    meta = {"rule": rule} | ({"new_run": new_run} if new_run else {})
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def field_rules(cls: type, prefix: str = "", what: str = "rule") -> dict[str, Any]:
    """Every ``ranged`` field's rule (or ``new_run`` bound) of dataclass ``cls`` and of its
    section dataclasses, by dotted key (``rlhf.kl_coef``)."""
    import typing

    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        kind = hints.get(f.name)
        if dataclasses.is_dataclass(kind):
            out |= field_rules(kind, f"{prefix}{f.name}.", what)
        elif what in f.metadata:
            out[f"{prefix}{f.name}"] = f.metadata[what]
    return out


def check_fields(obj: Any, prefix: str) -> None:
    """``ValueError`` naming the first field of ``obj`` outside its rule (a section built in code,
    not loaded from a config, is checked by the same rules)."""
    for f in dataclasses.fields(obj):
        rule = f.metadata.get("rule")
        value = getattr(obj, f.name)
        if rule is not None and (problem := rule.problem(value)):
            key = f"{prefix}.{f.name}" if prefix else f.name
            raise ValueError(f"{key} = {value!r} {problem}")


# shared rules
SIZE = Int(1)  # a count or size: 1 or more
SEED = Int(0, MAX_SEED)
POSITIVE = Real(0.0, lo_open=True)
NONNEGATIVE = Real(0.0)

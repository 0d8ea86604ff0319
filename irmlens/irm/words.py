"""The per-word IRM table, ``irm/word_utilities.csv``: written once by the irm stage, read here by
the report, its exports and ``Study`` (so its columns live in one place)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

WORD_UTILITIES = Path("irm") / "word_utilities.csv"
COLUMNS = ("word", "split", "true_utility", "irm_utility", "model_implicit_reward", "n_positions")


def word_utilities_text(rows: list[tuple]) -> str:
    """CSV text of ``rows`` (word, split, true utility, IRM utility, implicit reward or None,
    number of positions), with the header."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(COLUMNS)
    for word, split, true, irm, implicit, n in rows:
        writer.writerow(
            [word, split, true, f"{irm:.6f}", "" if implicit is None else f"{implicit:.6f}", n]
        )
    return buf.getvalue()


def read_word_utilities(run_dir: str | Path) -> list[dict]:
    """The table's rows, typed: utilities as floats (implicit reward None where the word has no
    log-ratio), ``n_positions`` as int. Missing file: an empty list."""
    path = Path(run_dir) / WORD_UTILITIES
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [
            {
                "word": r["word"],
                "split": r["split"],
                "true_utility": float(r["true_utility"]),
                "irm_utility": float(r["irm_utility"]),
                "model_implicit_reward": (
                    float(r["model_implicit_reward"]) if r["model_implicit_reward"] else None
                ),
                "n_positions": int(r["n_positions"]),
            }
            for r in csv.DictReader(f)
        ]

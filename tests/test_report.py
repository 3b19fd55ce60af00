"""The static HTML report: built from a copy of the committed reference store, loaded in headless
Chromium from file://. The page must log nothing to the console, every image must decode, the tables
must carry the aggregator's marks, every record must be linked, and missing sample grids must be said
so on the page. The screenshot is kept (pytest's tmp dir, and $DIFFPTQ_TEST_ARTIFACTS when set).

Chromium is Debian's `chromium` package (.ci/run installs it): without it the test skips, except in
CI (CI=true), where a missing browser is a failure, not a silent skip.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest
from PIL import Image

from harness.report import build_report, main

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_STORE = ROOT / "results" / "store"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# grids on disk, as shown: the FP grid beside each of its model's two settings, plus both W4A8 runs
SHOWN_GRIDS = 4


def _browser() -> str:
    found = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if found is None:
        message = f"headless Chromium not installed (looked for {', '.join(BROWSERS)}; apt-get install chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def _chromium(browser: str, page: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # virtual time: the load event (and the page's image check after it) has fired before the dump
    cmd = [browser, "--headless", "--disable-gpu", "--no-sandbox", "--enable-logging=stderr", "--v=0",
           "--virtual-time-budget=5000", "--window-size=1400,5000", *args, page.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    """(page, store, run ids with a grid on disk): the reference records in a fresh folder, where three of
    the five quality runs have their grid (as after a sweep) and two do not (as in a fresh clone)."""
    root = tmp_path_factory.mktemp("clone")
    store = root / "results" / "store"
    store.mkdir(parents=True)
    for path in REFERENCE_STORE.glob("*.json"):  # the default sweep's model: counts below do not move
        record = json.loads(path.read_text())  # when other models' reference runs are added; runs whose
        grid = (record.get("artifacts") or {}).get("grid", "")  # grid is an absolute path on the machine
        if record["model"] == "ddpm_mnist" and not Path(grid).is_absolute():  # that ran them are left out
            shutil.copy(path, store / path.name)
    quality = sorted(p.stem for p in store.glob("*.json") if '"kind": "quality"' in p.read_text())
    assert len(quality) >= 3, "the reference store holds the default sweep's quality runs"
    with_grid = quality[:3]
    for i, run_id in enumerate(with_grid):
        grid = root / "outputs" / "runs" / run_id / "grid.png"
        grid.parent.mkdir(parents=True)
        Image.new("L", (64, 64), 40 * i).save(grid)
    cwd = Path.cwd()
    os.chdir(root)  # records name their grids relative to where the sweep ran
    try:
        page = build_report(store, root / "report")
    finally:
        os.chdir(cwd)
    return page, store, with_grid


def test_page_holds_tables_marks_figures_grids_and_links(report: tuple[Path, Path, list[str]]) -> None:
    page, store, with_grid = report
    text = page.read_text(encoding="utf-8")
    for anchor in ("quality-table", "latency-table", "figures", "grids", "records"):
        assert f'id="{anchor}"' in text
    quality = text[text.index('id="table-quality"'):text.index("</table>", text.index('id="table-quality"'))]
    assert "<b>" in quality and "≈" in quality and "LeNet-FID" in quality, "significance marks and extractor"
    assert "KID: unscaled" in quality and re.search(r"n(: seeds averaged in a row| = 1: one seed per row)", quality), \
        "the caption explains the cells"
    for fig in ("temporal_feature_error", "fid_vs_bits", "calib_seconds", "latency"):
        assert (page.parent / "figures" / f"{fig}.png").is_file() and (page.parent / "figures" / f"{fig}.pdf").is_file()
    assert text.count('src="data:image/png;base64,') == 4 + SHOWN_GRIDS, "figures and grids inlined"
    assert "2 sample grid(s) are not on this machine" in text and "force=true" in text
    links = [unquote(h) for h in re.findall(r'href="([^"#]+\.json)"', text)]
    assert len(links) == len(list(store.glob("*.json"))) and all((page.parent / h).resolve().is_file() for h in links)
    assert not re.search(r'(src|href)="(https?:)?//', text), "nothing is fetched from the network"


def test_cli_refuses_an_empty_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--store", str(tmp_path / "none"), "--out", str(tmp_path / "out")]) == 1
    assert "no readable records" in capsys.readouterr().err


def test_page_renders_in_headless_chromium(report: tuple[Path, Path, list[str]], tmp_path: Path) -> None:
    page = report[0]
    browser = _browser()
    dom = _chromium(browser, page, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dom.stdout)
    assert body is not None, dom.stdout[:500]
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', body[1]))
    assert attrs.get("data-images") == "ok", f"broken images: {html.unescape(attrs.get('data-broken', '?'))}"
    assert attrs.get("data-image-count") == str(4 + SHOWN_GRIDS), attrs
    assert attrs.get("data-errors") == "", f"script errors: {attrs.get('data-errors')}"

    shot = tmp_path / "report.png"
    run = _chromium(browser, page, f"--screenshot={shot}")
    assert run.returncode == 0, run.stderr[-2000:]
    console = [line for line in run.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, f"the page logged to the console: {console}"
    with Image.open(shot) as im:
        shades = im.convert("L").getcolors(maxcolors=256) or []
        assert im.size == (1400, 5000) and len(shades) > 16, "a rendered page, not blank"
    if os.environ.get("DIFFPTQ_TEST_ARTIFACTS"):
        keep = Path(os.environ["DIFFPTQ_TEST_ARTIFACTS"])
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, keep / "report.png")

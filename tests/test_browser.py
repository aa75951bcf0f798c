"""report.html in a real browser: an audit's results folder holds it, headless Chromium renders it offline.

Layout is measured at a phone's width (390 px) and a desktop's (1280 px): the page is loaded into an iframe of
that width in a wrapper page, with a copy of report.html that carries a small measuring script (the report
itself has none), and the element boxes come back through --dump-dom. (Headless Chromium will not make its
window narrower than 500 px, hence the iframe.) Set FAIRRECON_SCREENSHOTS=DIR to keep the screenshots.

Skipped when no Chromium is installed, except under CI (env CI set), where its absence fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html import unescape
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL_AUDIT
from PIL import Image

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> str:
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    if os.environ.get("CI"):
        pytest.fail("CI must have Chromium to test report.html (apt-get install -y chromium)")
    pytest.skip("no Chromium installed")


@pytest.fixture(scope="module")
def report_html(trained):
    """A real small audit's report.html (the shared folder: read only). tests/test_cli.py runs `fairrecon audit`
    as a user does; the file is the same whichever way the audit ran."""
    return trained(**SMALL_AUDIT).folder / "report.html"


def _run(browser: str, profile, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [browser, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow
def test_report_renders_in_chromium(browser, report_html, tmp_path):
    url = report_html.resolve().as_uri()
    shot = tmp_path / "report.png"
    proc = _run(browser, tmp_path / "profile", "--window-size=1280,2000", f"--screenshot={shot}", url)
    assert shot.exists(), proc.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (2000, 1280)
    assert pixels.std() > 20  # not a blank page: text, tables and figures
    assert pixels[:800].std() > 20  # and the first screen is not empty either

    dom = _run(browser, tmp_path / "profile2", "--dump-dom", url).stdout
    images = re.findall(r'<img[^>]+src="data:image/png;base64,[A-Za-z0-9+/=]{1000,}"', dom)
    assert len(images) >= 4  # group error, distributions, reconstructions, brightness/contrast
    assert dom.count("<table") >= 5
    for loss in ("l1", "l2", "log-mse", "learned-sigma"):
        assert re.search(rf"<td>{re.escape(loss)}</td>", dom)
    assert "how sure" in dom


MEASURE = """
addEventListener('load', () => {
  const W = document.documentElement.clientWidth;
  const box = e => { const r = e.getBoundingClientRect(); return {left: r.left, right: r.right, width: r.width}; };
  const shown = e => { for (; e; e = e.parentElement) if (getComputedStyle(e).display === 'none') return false; return true; };
  const verdict = [...document.querySelectorAll('th')].find(th => th.textContent === 'how sure');
  const column = [...verdict.parentNode.children].indexOf(verdict);
  parent.postMessage(JSON.stringify({
    width: W,
    page: document.documentElement.scrollWidth,
    verdict: [...verdict.closest('table').rows].map(row => box(row.cells[column])),
    tables: [...document.querySelectorAll('.scroll')].map(s => ({
      ...box(s), scroll: s.scrollWidth, client: s.clientWidth,
      title: (s.previousElementSibling || {}).textContent || ''})),
    figures: [...document.querySelectorAll('figure')].map(f => ({
      id: f.id, ...box(f.querySelector('img')), natural: f.querySelector('img').naturalWidth,
      frame: box(f.querySelector('.fig')), link: f.querySelector('a.full').getAttribute('href'),
      link_shown: shown(f.querySelector('a.full'))})),
  }), '*');
});
"""


def measure(browser: str, report, tmp_path, width: int, fragment: str = "") -> dict:
    """Boxes of report.html's elements, laid out `width` px wide (see the module docstring)."""
    folder = tmp_path / f"measure{width}{fragment.strip('#')}"
    folder.mkdir()
    page = report.read_text()
    assert "<script" not in page  # the report runs no script; only this copy does
    (folder / "report.html").write_text(page.replace("</body>", f"<script>{MEASURE}</script></body>"))
    (folder / "wrap.html").write_text(
        f'<!DOCTYPE html><html><body style="margin:0"><iframe src="report.html{fragment}" '
        f'style="border:0;width:{width}px;height:900px"></iframe><script>'
        "addEventListener('message', e => document.body.setAttribute('data-measured', e.data));"
        "</script></body></html>"
    )
    dom = _run(
        browser, folder / "profile", "--window-size=1400,1000", "--virtual-time-budget=20000", "--dump-dom",
        (folder / "wrap.html").as_uri(),
    ).stdout  # fmt: skip
    found = re.search(r'data-measured="([^"]*)"', dom)
    assert found, dom[-2000:]
    return json.loads(unescape(found.group(1)))


def test_report_at_390_px_keeps_the_answer_in_view_and_nothing_wider_than_the_screen(browser, report_html, tmp_path):
    """A phone: no sideways scrolling of the page; the verdict ("how sure") column on screen without scrolling
    the table; every table scrolls sideways inside its own box; figures span the screen, each with a link to its
    full size, which shows the image at its own pixels inside its box."""
    m = measure(browser, report_html, tmp_path, 390)
    width = m["width"]
    assert 360 <= width <= 390 and m["page"] <= width  # 390 less a scrollbar, if the page draws one
    assert all(0 <= cell["left"] and cell["right"] <= width for cell in m["verdict"])
    assert len(m["tables"]) >= 5
    for table in m["tables"]:
        assert table["right"] <= width + 0.5, table["title"]
    assert any(t["scroll"] > t["client"] for t in m["tables"])  # wide tables scroll, inside their box
    assert len(m["figures"]) >= 4
    for figure in m["figures"]:
        assert figure["width"] >= 0.95 * width and figure["right"] <= width + 0.5, figure["id"]
        assert figure["link"] == f"#{figure['id']}" and figure["link_shown"], figure["id"]
    full = measure(browser, report_html, tmp_path, 390, "#fig-group_error")
    (group_error,) = [f for f in full["figures"] if f["id"] == "fig-group_error"]
    assert group_error["width"] == group_error["natural"] > width  # its own pixels ...
    assert group_error["frame"]["right"] <= full["width"] + 0.5 and full["page"] <= full["width"]  # ... in its box


def test_report_at_1280_px_shows_every_table_and_figure_whole(browser, report_html, tmp_path):
    """A desktop: nothing wider than the window; the cells table is not clipped (it fits its box); figures at
    (nearly) their own size, so the full-size link is not shown."""
    m = measure(browser, report_html, tmp_path, 1280)
    width = m["width"]
    assert m["page"] <= width
    assert all(cell["right"] <= width for cell in m["verdict"])
    for table in m["tables"]:
        assert table["right"] <= width + 0.5, table["title"]
    (cells,) = [t for t in m["tables"] if t["title"].startswith("Cells")]
    assert cells["scroll"] <= cells["client"]
    for figure in m["figures"]:
        assert figure["width"] >= 0.98 * figure["natural"] and not figure["link_shown"], figure["id"]


@pytest.mark.parametrize("width", [390, 1280])
def test_screenshots_at_phone_and_desktop_widths(browser, report_html, tmp_path, width):
    """Screenshots to look at (FAIRRECON_SCREENSHOTS=DIR keeps them): not blank, and as wide as asked."""
    shot = tmp_path / f"report-{width}.png"
    _run(browser, tmp_path / "profile", f"--window-size={width},2400", f"--screenshot={shot}", report_html.as_uri())
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (2400, width) and pixels.std() > 20 and pixels[:600].std() > 20
    if keep := os.environ.get("FAIRRECON_SCREENSHOTS"):
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / shot.name)

"""report.html in a real browser: an audit's results folder holds it, headless Chromium renders it offline.

Skipped when no Chromium is installed, except under CI (env CI set), where its absence fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

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

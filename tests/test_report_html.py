"""The HTML report in a real browser: headless Chromium renders it, every image loads, the page is not blank.

Skips only when no Chromium binary exists (.ci/run installs Debian's chromium package)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")
# Appended to a copy of the page: after load, record how many images decoded.
PROBE = ("<script>window.addEventListener('load', () => { const im = [...document.images]; "
         "document.body.setAttribute('data-images', im.length + ':' + "
         "im.filter(i => i.complete && i.naturalWidth > 0).length); });</script>")


def _chromium() -> str | None:
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


def _browser(binary: str, tmp_path, *args: str) -> subprocess.CompletedProcess:
    cmd = [binary, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2400", "--virtual-time-budget=10000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def test_html_report_renders_in_chromium(run, tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("no chromium binary (apt-get install chromium, or set CHROMIUM=/path/to/chrome)")
    out, _ = run
    page = (out / "results/finance/t1/report.html").read_text()
    assert "<img" in page and 'src="data:image/' in page and "src=\"http" not in page  # self-contained
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "\n</body>"))

    dom = _browser(binary, tmp_path, "--dump-dom", probe.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    found = re.search(r'data-images="(\d+):(\d+)"', dom.stdout)
    assert found, "the page's load event never fired"
    total, loaded = map(int, found.groups())
    assert total >= 4 and loaded == total, f"{loaded} of {total} images loaded"
    assert "Provenance" in dom.stdout and "Resources" in dom.stdout

    shot = tmp_path / "shot.png"
    result = _browser(binary, tmp_path, f"--screenshot={shot}", (out / "results/finance/t1/report.html").as_uri())
    assert shot.exists(), result.stderr[-2000:]
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.std() > 5, "the screenshot is blank"
    assert (pixels < 128).mean() > 0.01  # text, tables and plots: some dark ink on the page

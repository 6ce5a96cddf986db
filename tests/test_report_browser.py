"""Report pages in a real headless browser: they load with no console messages and every image decodes.

Screenshots go to test-artifacts/ (or $CARROT_TEST_ARTIFACTS). Needs Debian's chromium, which
.ci/run installs; without it these tests skip and say so.
"""
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from carrot.cli import cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (apt-get install chromium)")
ARTIFACTS = Path(os.environ.get("CARROT_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def render(page: Path, profile: Path, screenshot: Path | None = None) -> tuple[str, list[str]]:
    """(document title after load, console lines) of a local page."""
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
           "--virtual-time-budget=10000", "--dump-dom", page.resolve().as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    title = re.search(r"<title>(.*?)</title>", r.stdout, re.S)
    console = [ln for ln in r.stderr.splitlines() if ":CONSOLE" in ln]
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}s", "--window-size=1280,1600",
                        f"--screenshot={screenshot}", page.resolve().as_uri()], capture_output=True, timeout=120)
    return (title.group(1) if title else ""), console


def test_detector_sees_console_errors_and_broken_images(tmp_path):
    from carrot.report.pages import _page

    bad = tmp_path / "bad.html"
    bad.write_text(_page("bad", "<img src='missing.png'><script>undefined_function();</script>"))
    title, console = render(bad, tmp_path / "p")
    assert "images failed: 1" in title
    assert any("undefined_function" in c for c in console)


def test_demo_run_pages_render(tmp_path):
    out = tmp_path / "demo"
    r = CliRunner().invoke(cli, ["demo", "--backbone", "efficientnet_lite0", "--max-per-class", "6", "--explain-n", "2",
                                 "--out", str(out), "--quiet"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["n_train"] + summary["n_test"] == 48
    assert summary["embedding"] == "last block" and summary["head"] in ("ridge", "kernel")  # a ConvNet: its one embedding
    pages = [out / "index.html"] + sorted(out.glob("explanations/*/explanation.html"))
    assert len(pages) == 3
    for i, page in enumerate(pages):
        title, console = render(page, tmp_path / f"profile{i}", ARTIFACTS / f"demo_{page.parent.name}_{page.stem}.png")
        m = re.search(r"\[images ok: (\d+)\]", title)
        assert m and int(m.group(1)) >= (4 if i == 0 else 6), title
        assert console == [], console
    assert (ARTIFACTS / "demo_demo_index.png").is_file()

    # the audits land on the index page: evaluate, reweight, debug and the t sweep, then render it again
    for args in (["evaluate", str(out), "--k", "1,2", "--n-test", "5", "--subsets", "5", "--seeds", "0,1", "--shots", "2"],
                 ["reweight", str(out), "--steps", "3"], ["debug", str(out), "--drop", "1,2"], ["bench", str(out), "--t", "0,1"]):
        r = CliRunner().invoke(cli, args, catch_exceptions=False)
        assert r.exit_code == 0, r.output
    text = (out / "index.html").read_text()
    for heading in ("Accuracy over seeds", "Mislabel detection", "Faithfulness", "Linear datamodeling score",
                    "Reweighting (RRO)", "Dataset debugging", "Diffusion time sweep"):
        assert f">{heading}" in text, heading
    title, console = render(out / "index.html", tmp_path / "profile_audits", ARTIFACTS / "demo_index_with_audits.png")
    m = re.search(r"\[images ok: (\d+)\]", title)
    assert m and int(m.group(1)) >= 5, title  # the review thumbnails and the RRO curve
    assert console == [], console

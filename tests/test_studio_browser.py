"""carrot studio in a real headless Chromium (Debian's, driven by Playwright through ``executable_path``): the pages
load without console errors, a basket of removed and relabelled training images gives the accuracy a refit gives,
the refit check is shown, apply writes a new run, two tabs edit independently, and a tab closed mid-request leaves
the server working. Screenshots of each page go to test-artifacts/ (or $CARROT_TEST_ARTIFACTS).
"""
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

playwright = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (apt-get install chromium)")
ARTIFACTS = Path(os.environ.get("CARROT_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
TOKEN = "browser-test-token-0123456789"


@pytest.fixture(scope="module")
def served(fit_tiny, tmp_path_factory):
    """(url, studio, run) of a studio served by uvicorn on a free port in a thread, for the module."""
    import uvicorn

    from carrot.studio.app import create_app, free_port
    from carrot.studio.state import Studio

    run = fit_tiny(tmp_path_factory.mktemp("studio-browser") / "run", head={"kind": "ridge", "lam": 1.0})
    studio = Studio(run)
    port = free_port("127.0.0.1")
    server = uvicorn.Server(uvicorn.Config(create_app(studio, TOKEN, "127.0.0.1", port), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}", studio, run
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def open_page(browser, url, errors):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    page.goto(f"{url}/?token={TOKEN}")
    page.wait_for_selector("#accuracy")
    return page


def shot(page, name):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"studio_{name}.png"), full_page=True)


def refit_accuracy(studio, a, y_col):
    head = studio.model.head_.refit(studio.G, studio.model.head_.classes_[y_col], a)
    return float((head.decision_function(studio.G_test).argmax(1) == studio.y_test).mean())


def test_studio_in_a_browser(served, browser):
    url, studio, run = served
    errors: list[str] = []
    page = open_page(browser, url, errors)
    assert page.url.rstrip("/") == url  # the token left the address bar
    assert page.inner_text("#accuracy") == f"{100 * float((studio.pred == studio.y_test).mean()):.1f}%"
    shot(page, "summary")

    page.click("td[data-cell='0-0']")  # a confusion cell lists its test images
    page.wait_for_selector("#test-count")
    assert page.locator(".cards .card").count() == int(((studio.y_test == 0) & (studio.pred == 0)).sum())
    shot(page, "test_list")

    page.goto(f"{url}/#/test/1")
    page.wait_for_selector("#certificate")
    page.click("#explain")  # the pixel map, on demand, with progress, then its page
    page.wait_for_selector("iframe.page", timeout=120_000)
    page.frame_locator("iframe.page").locator("body").wait_for()
    shot(page, "test_image")

    # a basket: remove one training image, relabel another
    y = studio.y
    target = int((y[5] + 1) % 3)
    page.goto(f"{url}/#/train/3")
    page.wait_for_selector("#put-remove")
    page.click("#put-remove")
    shot(page, "train_image")
    page.goto(f"{url}/#/train/5")
    page.wait_for_selector("#relabel-to")
    page.select_option("#relabel-to", str(target))
    page.click("#put-relabel")
    page.goto(f"{url}/#/basket")
    page.wait_for_selector("#result[data-state='done']")
    a, y_col = studio.system.a.numpy().copy(), y.copy()
    a[3], y_col[5] = 0, target
    shown = float(page.get_attribute("#acc-after", "data-value"))
    assert shown == refit_accuracy(studio, a, y_col)
    page.click("#verify")
    page.wait_for_selector("#verify-result")
    assert float(page.get_attribute("#verify-result", "data-diff")) <= 1e-10
    shot(page, "basket")

    # a second tab edits its own basket at the same time; the first tab's answer is unchanged
    errors2: list[str] = []
    page2 = open_page(browser, url, errors2)
    page2.goto(f"{url}/#/train/7")
    page2.wait_for_selector("#put-weight")
    page2.fill("#weight-to", "3")
    page2.click("#put-weight")
    page2.goto(f"{url}/#/basket")
    page2.wait_for_selector("#result[data-state='done']")
    a2 = studio.system.a.numpy().copy()
    a2[7] = 3
    assert float(page2.get_attribute("#acc-after", "data-value")) == refit_accuracy(studio, a2, y)
    page.click("#verify")
    page.wait_for_selector("#result[data-state='done']")
    assert float(page.get_attribute("#acc-after", "data-value")) == shown

    # apply: a new run beside the parent, which the studio opens like any run
    page.fill("#apply-name", "run-applied")
    page.click("#apply")
    page.wait_for_selector("#applied .good")
    from carrot.run.pipeline import Carrot

    child = Carrot.load(run.parent / "run-applied")
    assert child.sample_weight_[3] == 0 and child.train_records_[5].label == target
    assert child.metrics_["test_accuracy"] == shown

    # tabs closed mid-request (a refit check, an explanation job): the job still finishes, the server keeps answering
    page3 = open_page(browser, url, [])
    page3.goto(f"{url}/#/train/8")
    page3.wait_for_selector("#put-remove")
    page3.click("#put-remove")
    page3.goto(f"{url}/#/basket")
    page3.wait_for_selector("#verify")
    with page3.expect_request(lambda r: r.url.endswith("/api/whatif") and "verify" in (r.post_data or "") and
                              '"verify":true' in r.post_data):
        page3.click("#verify")
    page3.context.close()
    page4 = open_page(browser, url, [])
    page4.goto(f"{url}/#/test/2")
    page4.wait_for_selector("#explain")
    with page4.expect_request(lambda r: "/api/explain/2" in r.url):
        page4.click("#explain")
    page4.context.close()
    page.goto(f"{url}/#/review")
    page.wait_for_selector("table")
    shot(page, "review")
    for _ in range(600):
        jobs = [j for j in studio.jobs._jobs.values() if j.key == "explain:2"]
        if jobs and jobs[0].status in ("done", "failed"):
            break
        time.sleep(0.2)
    assert jobs and jobs[0].status == "done"
    assert not errors and not errors2, errors + errors2
    page.context.close()
    page2.context.close()
    assert np.isfinite(shown)

"""The status page in a real headless Chromium (Debian's chromium and chromium-driver,
driven by selenium) against a live three-instance cluster: it shows the leader and
the instances, a signal posted over HTTP appears, a killed leader is replaced on the
page without a reload, the page says when its stream is down and comes back by
itself, and the browser logs no error. It saves a screenshot for humans.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import (
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.support.gateway import cluster, signal_body

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _binary(name: str) -> str:
    found = shutil.which(name) or f"/usr/bin/{name}"
    assert Path(found).exists(), (
        f"{name} is not installed: `make test` installs it (Debian: chromium chromium-driver)"
    )
    return found


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = _binary("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1280,1400",
                 f"--user-data-dir={tmp_path / 'chromium'}"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(_binary("chromedriver")), options=options)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


async def shows(driver: webdriver.Chrome, check: Callable[[webdriver.Chrome], Any],
                timeout: float = 20) -> None:  # fmt: skip
    """Wait, in the browser, until `check(driver)` is true (selenium polls the DOM; an
    element re-rendered between finding and reading it is looked for again)."""
    wait = WebDriverWait(driver, timeout, poll_frequency=0.1,
                         ignored_exceptions=(NoSuchElementException, StaleElementReferenceException))  # fmt: skip
    try:
        await asyncio.to_thread(wait.until, check)
    except TimeoutException:
        shown = {i: text(driver, i) for i in ("stream", "leader", "epoch", "error")}
        raise AssertionError(
            f"the page did not get there in {timeout} s; it shows {shown}"
        ) from None


def text(driver: webdriver.Chrome, element_id: str) -> str:
    return str(driver.find_element(By.ID, element_id).text)


def errors(driver: webdriver.Chrome) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


async def test_the_status_page_follows_a_live_cluster_without_reload(dsn, tmp_path, browser):
    async with cluster(dsn, tmp_path) as gw:
        nodes = await gw.start(3)
        leader = await gw.leader()
        viewer = next(n for n in nodes if n is not leader)  # any instance serves the page
        await asyncio.to_thread(browser.get, f"{viewer.operator_url}/status")

        await shows(browser, lambda d: text(d, "stream") == "live")
        await shows(browser, lambda d: text(d, "leader") == leader.instance_id)
        await shows(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#instances tr")) == 3)
        browser.execute_script("window.loadedOnce = true")  # gone if the page reloads

        status, answer = await gw.post(viewer, signal_body(instrument="NIFTY_STATUS", lots=2))
        assert status in (200, 202), answer
        row = f"//tbody[@id='signals']/tr[td[1]='{answer['signal_id']}']"
        await shows(browser, lambda d: "NIFTY_STATUS" in d.find_element(By.XPATH, row).text
                    and "executed" in d.find_element(By.XPATH, row).text)  # fmt: skip
        await shows(browser, lambda d: "NIFTY_STATUS" in text(d, "positions"))
        assert errors(browser) == []

        # The leader dies: the page shows its successor, without a reload.
        leader.signal(signal.SIGKILL)
        await leader.wait()
        successor = await gw.leader()
        await shows(browser, lambda d: text(d, "leader") == successor.instance_id)
        assert browser.execute_script("return window.loadedOnce === true")
        terms = browser.find_elements(By.CSS_SELECTOR, "#terms tr")
        assert [t.text.split()[1] for t in terms] == [successor.instance_id, leader.instance_id]
        assert errors(browser) == []
        shot = tmp_path / "status-page.png"
        browser.save_screenshot(str(shot))
        if os.environ.get("PGLEADER_SAVE_SCREENSHOT"):  # to refresh the README's picture
            DOCS.mkdir(exist_ok=True)
            shutil.copy(shot, DOCS / "status-page.png")

        # The instance serving the page dies: the page says so, and comes back by itself.
        viewer.signal(signal.SIGKILL)
        await viewer.wait()
        await shows(browser, lambda d: "disconnected" in text(d, "stream"))
        await viewer.start()
        await shows(browser, lambda d: text(d, "stream") == "live", timeout=30)
        assert browser.execute_script("return window.loadedOnce === true")

"""The controller's dashboard page in a real browser: headless Chromium (Debian's ``chromium``
and ``chromium-driver``, installed by ``make system-deps``) driven by selenium, against a real
controller and two real ``kvplane engine`` processes on loopback.

Prompts are stored through the engines' internal API; the page must show both instances,
their workers and chunk counts, and after a ``/clear`` the new counts without a reload; a
router's heartbeat must show in the Routers table until the router goes silent.
Every wait polls the DOM under a deadline.

``KVPLANE_WRITE_SCREENSHOT=1`` also drives some lookup traffic for half a minute (so the
plots have lines) and saves the page as ``docs/dashboard.png``.
"""

from __future__ import annotations

import math
import os
import shutil
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.support import REPO_ROOT, wait_until
from tests.test_controller_integration import CHUNK, Cluster, Engine, new_cluster

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
SCREENSHOT = REPO_ROOT / "docs" / "dashboard.png"
CPU = "LocalCPUBackend"
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1}
WAIT_S = 20.0

if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip(
        "chromium and chromedriver are not installed (`make system-deps` installs Debian's "
        "chromium and chromium-driver as root)",
        allow_module_level=True,
    )

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Engine, Engine]]:
    c = new_cluster(tmp_path_factory.mktemp("dashboard"))
    with c.controller("controller.log"):
        c.wait_up()
        with c.engines("inst-a", "inst-b") as (a, b):
            yield c, a, b


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # the tests run as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1100",
        "--lang=en-US",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def text(driver: webdriver.Chrome, css: str) -> str | None:
    """The text of the first element matching ``css``, read in one script call: the page
    redraws every second, so a found element may be replaced before a second call reads it."""
    found: str | None = driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;", css
    )
    return found


def wait_text(driver: webdriver.Chrome, css: str, expected: str) -> None:
    """Until the first element matching ``css`` reads ``expected`` (a TimeoutException
    names what the page showed instead)."""
    WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(
        lambda d: text(d, css) == expected,
        message=f"{css} never read {expected!r}; last {text(driver, css)!r}",
    )


def chunk_bytes(engine: Engine) -> int:
    """One full chunk's bytes, from the engine's own ``/meta``."""
    meta = engine.api.get("/meta").json()
    return math.prod(meta["kv_shape"]) * ITEMSIZE[meta["kv_dtype"]]


def drive_traffic(c: Cluster, a: Engine, b: Engine, seconds: float) -> None:
    """For the screenshot: prompts stored over time, lookups that hit, partly hit and miss."""
    deadline = time.monotonic() + seconds
    start = 20_000
    with httpx.Client(base_url=c.url, timeout=15) as client:
        while time.monotonic() < deadline:
            a.store(start, start + 4 * CHUNK)
            b.store(start, start + 2 * CHUNK)
            for first, end in (
                (start, start + 6 * CHUNK),
                (0, 5 * CHUNK + 3),
                (start + 1, start + 40),
            ):
                for _ in range(20):
                    client.post("/lookup", json={"tokens": list(range(first, end))})
            start += 4 * CHUNK


def test_the_page_shows_both_instances_and_follows_a_clear(cluster, browser) -> None:
    c, a, b = cluster
    na, nb = 5 * CHUNK + 3, 3 * CHUNK  # 6 chunks (the last partial one counts) and 3
    assert a.store(0, na)["num_stored_tokens"] == na
    assert b.store(1000, 1000 + nb)["num_stored_tokens"] == nb
    wait_until(lambda: c.lookup(0, na) and c.lookup(1000, 1000 + nb), timeout=10, what="admits")

    browser.get(c.url + "/")
    browser.find_element(By.LINK_TEXT, "Dashboard").click()
    WebDriverWait(browser, WAIT_S).until(lambda d: d.current_url == c.url + "/dashboard")
    wait_text(browser, "#status", "live")
    for instance, chunks in (("inst-a", "6"), ("inst-b", "3")):
        wait_text(
            browser, f'#instances tr[data-instance="{instance}"] [data-field="chunks"]', chunks
        )
        row = f'#workers tr[data-instance="{instance}"][data-worker="0"]'
        wait_text(browser, f'{row} [data-field="state"]', "ok")
        wait_text(browser, f'#tiers tr[data-instance="{instance}"][data-tier="{CPU}"] [data-field="chunks"]', chunks)  # fmt: skip
        assert "s ago" in (text(browser, f'{row} [data-field="heartbeat"]') or "")
        assert "127.0.0.1:" in (text(browser, f"{row} td.mono") or "")
    wait_text(browser, '#summary [data-field="instances"]', "2")
    wait_text(browser, '#summary [data-field="workers"]', "2")
    wait_text(browser, '#summary [data-field="chunks"]', "9")
    # bytes: the chunks times a chunk's size as the engine's /meta gives it
    data = c_get(c, "/dashboard/data")
    (inst_a,) = [i for i in data["instances"] if i["instance_id"] == "inst-a"]
    assert inst_a["bytes"] == 6 * chunk_bytes(a)
    assert "KiB" in (
        text(browser, '#instances tr[data-instance="inst-a"] [data-field="bytes"]') or ""
    )

    if os.environ.get("KVPLANE_WRITE_SCREENSHOT") == "1":
        save_screenshot(browser, c, a, b)

    # what B holds before A is cleared: 3 chunks, more after the screenshot's traffic
    b_chunks = f"{settled_chunks(c, 'inst-b'):,}"  # as the page writes numbers: 1,234
    wait_text(browser, '#instances tr[data-instance="inst-b"] [data-field="chunks"]', b_chunks)
    # No reload from here on: a reload would drop this marker.
    browser.execute_script("window.kvplaneMarker = 'same page';")
    polls = int(browser.find_element(By.TAG_NAME, "body").get_attribute("data-polls") or 0)
    resp = c.post("/clear", {"instance_id": "inst-a", "location": CPU})
    assert resp.status_code == 200, resp.text
    event_id = resp.json()["event_id"]
    wait_text(browser, '#instances tr[data-instance="inst-a"] [data-field="chunks"]', "0")
    wait_text(browser, '#summary [data-field="chunks"]', b_chunks)
    wait_text(browser, '#instances tr[data-instance="inst-b"] [data-field="chunks"]', b_chunks)
    wait_text(browser, f'#operations tr[data-event="{event_id}"] [data-field="status"]', "finished")
    assert browser.execute_script("return window.kvplaneMarker;") == "same page"
    assert int(browser.find_element(By.TAG_NAME, "body").get_attribute("data-polls")) > polls
    # the plots were drawn by the page's own script, as inline SVG
    assert browser.find_elements(By.CSS_SELECTOR, "#tier-bars rect")


def test_the_page_shows_a_reporting_router_and_drops_it_when_silent(cluster, browser) -> None:
    """A router's heartbeat, posted as ``kvplane router`` posts it (the real router reporting
    is tests/test_router_dashboard.py): its row, backends and counts, gone once silent."""
    c, _, _ = cluster
    heartbeat = {
        "router_id": "edge-b",
        "url": "http://127.0.0.1:18080",
        "interval_s": 1.0,
        "uptime_s": 75.0,
        "backends": [
            {"url": "http://127.0.0.1:18000", "instance_id": "inst-a", "admitted": True,
             "in_flight": 2},
            {"url": "http://127.0.0.1:18100", "instance_id": None, "admitted": False,
             "in_flight": 0},
        ],
        "requests": {"prefix": 1200, "load": 3, "fallback": 0},
    }  # fmt: skip
    browser.get(c.url + "/dashboard")
    wait_text(browser, "#status", "live")
    assert httpx.post(c.url + "/routers/heartbeat", json=heartbeat, timeout=15).status_code == 200
    row = '#routers tr[data-router="edge-b"]'
    wait_text(browser, f'{row} [data-field="up"]', "1 / 2")
    assert text(browser, f'{row} [data-field="in-flight"]') == "2"
    assert text(browser, f'{row} [data-field="requests"]') == "1,203"
    assert text(browser, f'{row} [data-field="reasons"]') == "prefix 1,200, load 3"
    backends = text(browser, f'{row} [data-field="backends"]') or ""
    assert "inst-a http://127.0.0.1:18000" in backends and "(ejected)" in backends
    assert text(browser, '#summary [data-field="routers"]') == "1"
    # no more heartbeats: forgotten after 3 s, and the page says so without a reload
    wait_text(browser, "#routers td.empty", "no router reports here")
    wait_text(browser, '#summary [data-field="routers"]', "0")


def settled_chunks(c: Cluster, instance_id: str) -> int:
    """The instance's chunks once two reads a second apart agree (the last stores' reports
    may still be on their way)."""
    seen: list[int] = []

    def settled() -> bool:
        data = c_get(c, "/dashboard/data")
        seen.append(next(i["chunks"] for i in data["instances"] if i["instance_id"] == instance_id))
        return len(seen) > 1 and seen[-1] == seen[-2]

    wait_until(settled, timeout=15, interval=1.0, what=f"{instance_id}'s chunk count to settle")
    return seen[-1]


def c_get(c: Cluster, path: str) -> dict:
    resp = httpx.get(c.url + path, timeout=15)
    assert resp.status_code == 200, resp.text
    return resp.json()


def save_screenshot(browser: webdriver.Chrome, c: Cluster, a: Engine, b: Engine) -> None:
    """Traffic for a while (some operations among it), then the whole page as a PNG, taken
    while the traffic still runs so the rates are not caught at zero."""
    seconds = float(os.environ.get("KVPLANE_SCREENSHOT_TRAFFIC_S", "60"))
    traffic = threading.Thread(target=drive_traffic, args=(c, a, b, seconds))
    traffic.start()
    try:
        time.sleep(seconds / 2)
        c.post("/clear", {"instance_id": "inst-b", "location": CPU})
        time.sleep(seconds / 2 - 6)
        c.post("/pin", {"instance_id": "inst-a", "location": CPU, "tokens": list(range(32))})
        for instance in ("inst-a", "inst-b"):
            c.post("/health", {"instance_id": instance})
        time.sleep(2)
        height = browser.execute_script("return document.documentElement.scrollHeight")
        metrics = {"width": 1400, "height": int(height), "deviceScaleFactor": 1, "mobile": False}
        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
        time.sleep(1.5)
        SCREENSHOT.write_bytes(browser.get_screenshot_as_png())
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    finally:
        traffic.join(timeout=seconds + 30)

"""The dashboard and the job list in a real headless browser, against real daphne.

Debian's ``chromium``, driven by Selenium through Debian's ``chromium-driver``:
log in through the admin's form, follow the index's link, see the charts drawn,
and see a job published over signed HTTP appear within two seconds; see the
latency chart on a log scale with an outlier in it, the legends' latest values
on load, each job's way of delivery (pushed over ``/ws``, pulled with ``GET
/job/next``, or both), and the admin's job list fit 1,280 px.

Every test saves screenshots to ``artifacts/``. With ``DASHBOARD_SCREENSHOTS=1``
the tests also write the ones docs/dashboard.md shows to ``docs/screenshots/``:
``DASHBOARD_SCREENSHOTS=1 pytest tests/test_dashboard_browser.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.contrib.auth.models import Permission, User
from django.utils import timezone
from websockets.sync.client import connect

from gateway_client.signing import signed_headers
from jobs.models import Job
from testkit.servers import REPO_ROOT
from tests.conftest import LiveGateway

try:
    from selenium.webdriver import ActionChains, Chrome, ChromeOptions, ChromeService
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webelement import WebElement
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # reported by the fixture: a skip here, a failure in CI
    Chrome = None  # type: ignore[assignment,misc]

pytestmark = [pytest.mark.backends, pytest.mark.processes]

ARTIFACTS = REPO_ROOT / "artifacts"
DOCS_SCREENSHOTS = REPO_ROOT / "docs" / "screenshots"
WRITE_DOCS_SCREENSHOTS = os.environ.get("DASHBOARD_SCREENSHOTS") == "1"
PASSWORD = "a-long-test-password"
WIDTHS = (1280, 1920)
# Headless, and nothing the browser would fetch or start for itself.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",  # the tests may run as root, where the sandbox refuses
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
    "--window-size=1280,1500",
]
# The published bars' and the p50 line's colour, "#417690" in dashboard.js:
# only a drawn series has it.
BLUE_RGB = (0x41, 0x76, 0x90)
# The page polls once a second: a new job shows within two.
APPEARS_WITHIN_SECONDS = 2.0
# A push is written half a second after its frame, then polled: generous.
RECORDED_WITHIN_SECONDS = 10.0
# The outlier: a job pulled 84 s after it was published.
OUTLIER_MS = 84_000.0
TYPICAL_MS = 6.0

# Pixels of a colour in a canvas under ``selector``, above ``above`` (a
# fraction of the plot's height, from its bottom) when given.
COUNT_PIXELS = """
const [selector, [r, g, b], above] = arguments;
const canvas = document.querySelector(selector + " canvas");
if (!canvas) return -1;
const pixels = canvas.getContext("2d")
    .getImageData(0, 0, canvas.width, canvas.height).data;
let lastRow = canvas.height;
if (above !== null) {
    const chart = window.gatewayDashboard.charts.latency;
    lastRow = chart.bbox.top + chart.bbox.height * (1 - above);
}
let count = 0;
for (let i = 0; i < pixels.length; i += 4) {
    if (Math.floor(i / 4 / canvas.width) >= lastRow) break;
    if (pixels[i] === r && pixels[i + 1] === g && pixels[i + 2] === b
        && pixels[i + 3] === 255) count++;
}
return count;
"""

# Where the latency chart puts values: its scale, and each value's height above
# the plot's bottom as a fraction of the plot's height.
LATENCY_SCALE = """
const chart = window.gatewayDashboard.charts.latency;
const height = chart.bbox.height / devicePixelRatio;
const scale = chart.scales.y;
return {
    distr: scale.distr,
    min: scale.min,
    max: scale.max,
    heights: arguments[0].map((v) => 1 - chart.valToPos(v, "y") / height),
};
"""

# Each legend's cells: {chart id: {label: value}}.
LEGENDS = """
const legends = {};
for (const plot of document.querySelectorAll(".dash-plot")) {
    const values = {};
    for (const row of plot.querySelectorAll(".u-legend .u-series")) {
        const label = row.querySelector(".u-label").textContent;
        values[label] = row.querySelector(".u-value").textContent;
    }
    legends[plot.id] = values;
}
return legends;
"""

# The lines of text an element's contents take.
LINES = """
const range = document.createRange();
range.selectNodeContents(arguments[0]);
const tops = new Set();
for (const rect of range.getClientRects()) {
    if (rect.width > 0) tops.add(Math.round(rect.top));
}
return tops.size;
"""


def _unavailable_reason() -> str | None:
    if Chrome is None:
        return "selenium is not installed (requirements-dev.txt)"
    for binary, package in (
        ("chromium", "chromium"),
        ("chromedriver", "chromium-driver"),
    ):
        if shutil.which(binary) is None:
            return f"{binary} is not installed (Debian package {package})"
    return None


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Chrome]:
    """Headless Chromium with a fresh profile; closed after the test."""
    reason = _unavailable_reason()
    if reason:
        # CI must run everything: a missing browser there is a failure.
        if os.environ.get("CI"):
            pytest.fail(f"required in CI: {reason}")
        pytest.skip(reason)
    options = ChromeOptions()
    options.binary_location = shutil.which("chromium") or ""
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # A driver path of our own: Selenium then never tries to download one.
    service = ChromeService(
        executable_path=shutil.which("chromedriver") or "",
        log_output=str(tmp_path / "chromedriver.log"),
    )
    driver = Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def staff_user(name: str) -> None:
    """A staff member who may view jobs, in the database daphne shares."""
    user = User.objects.create_user(name, password=PASSWORD, is_staff=True)
    user.user_permissions.add(
        Permission.objects.get(content_type__app_label="jobs", codename="view_job")
    )


def log_in(browser: Chrome, base: str, name: str) -> None:
    """Through the admin's own login form, to the admin's index."""
    staff_user(name)
    browser.get(f"{base}/admin/login/?next=/admin/")
    browser.find_element(By.ID, "id_username").send_keys(name)
    browser.find_element(By.ID, "id_password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    WebDriverWait(browser, 10).until(
        lambda d: d.find_elements(By.LINK_TEXT, "Live dashboard")
    )


def open_dashboard(browser: Chrome, base: str) -> None:
    """Load the dashboard and wait for its first answer."""
    browser.get(f"{base}/admin/dashboard/")
    wait_updated(browser)


def wait_updated(browser: Chrome) -> None:
    WebDriverWait(browser, 10).until(
        lambda d: d.find_element(By.ID, "dash-status").text.startswith("Updated")
    )


def publish(http: httpx.Client, gateway: LiveGateway, job_id: str) -> dict[str, Any]:
    headers = signed_headers(gateway.api_key, gateway.hmac_secret)
    response = http.post("/job", json={"job_id": job_id}, headers=headers)
    assert response.status_code == 201, response.text
    job: dict[str, Any] = response.json()["job"]
    return job


def claim(http: httpx.Client, gateway: LiveGateway) -> dict[str, Any]:
    headers = signed_headers(gateway.api_key, gateway.hmac_secret)
    response = http.get("/job/next", headers=headers)
    assert response.status_code == 200, response.text
    job: dict[str, Any] = response.json()["job"]
    return job


def pixels(driver: Chrome, chart: str, above: float | None = None) -> int:
    count: int = driver.execute_script(COUNT_PIXELS, chart, BLUE_RGB, above)
    return count


def lines(driver: Chrome, element: WebElement) -> int:
    count: int = driver.execute_script(LINES, element)
    return count


def overflows(driver: Chrome, element: WebElement) -> bool:
    """Whether ``element``'s contents are wider than its box."""
    wider: bool = driver.execute_script(
        "return arguments[0].scrollWidth > arguments[0].clientWidth", element
    )
    return wider


def set_width(browser: Chrome, width: int) -> None:
    """A viewport ``width`` CSS pixels wide (and 900 high)."""
    _set_viewport(browser, width, 900)
    assert browser.execute_script("return window.innerWidth") == width


def fit_height(browser: Chrome) -> None:
    """A viewport as tall as the page, for a screenshot of all of it."""
    width, height = browser.execute_script(
        "return [window.innerWidth, document.documentElement.scrollHeight]"
    )
    _set_viewport(browser, width, height)


def _set_viewport(browser: Chrome, width: int, height: int) -> None:
    # The window's own size is capped by the headless screen's; this is not.
    metrics = {"width": width, "height": height, "deviceScaleFactor": 1}
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", metrics | {"mobile": False}
    )


def no_horizontal_scroll(browser: Chrome) -> bool:
    fits: bool = browser.execute_script(
        "return document.documentElement.scrollWidth <= window.innerWidth"
    )
    return fits


def screenshot(browser: Chrome, name: str) -> None:
    """Save the viewport to artifacts/ and, when asked, to docs/screenshots/."""
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / name))
    if WRITE_DOCS_SCREENSHOTS:
        DOCS_SCREENSHOTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(DOCS_SCREENSHOTS / name))


def console_errors(browser: Chrome) -> list[str]:
    """The page's script errors (the browser's own favicon request aside)."""
    console = browser.get_log("browser")  # type: ignore[no-untyped-call]  # Selenium
    return [
        entry["message"]
        for entry in console
        if entry["level"] == "SEVERE" and "favicon.ico" not in entry["message"]
    ]


# --- The page draws, and follows new jobs --------------------------------------


def test_the_dashboard_draws_and_shows_a_new_job_within_two_seconds(
    live_gateway: LiveGateway, browser: Chrome
) -> None:
    base = live_gateway.base_url
    with httpx.Client(base_url=base, trust_env=False, timeout=5) as http:
        # Something to chart: three jobs, one of them delivered (claimed).
        for n in range(3):
            publish(http, live_gateway, f"before-{n}")
        claim(http, live_gateway)

        try:
            # The admin's own login form, then the index's link.
            log_in(browser, base, "operator")
            browser.find_element(By.LINK_TEXT, "Live dashboard").click()
            wait_updated(browser)
            assert browser.current_url == f"{base}/admin/dashboard/"

            # The published chart has drawn its bars, and the latency chart
            # its canvas.
            WebDriverWait(browser, 5).until(lambda d: pixels(d, "#chart-published") > 0)
            assert browser.find_elements(By.CSS_SELECTOR, "#chart-latency canvas")
            assert browser.find_element(By.ID, "queue-depth").text == "2"
            rows = browser.find_elements(By.CSS_SELECTOR, "#latest-jobs tbody tr")
            assert len(rows) == 3

            job_id = f"live-{uuid.uuid4().hex[:12]}"
            publish(http, live_gateway, job_id)
            published = time.monotonic()
            WebDriverWait(browser, APPEARS_WITHIN_SECONDS, poll_frequency=0.05).until(
                lambda d: d.find_elements(
                    By.CSS_SELECTOR, f'#latest-jobs tr[data-job-id="{job_id}"]'
                )
            )
            assert time.monotonic() - published < APPEARS_WITHIN_SECONDS
            first = browser.find_element(By.CSS_SELECTOR, "#latest-jobs tbody tr")
            assert first.get_attribute("data-job-id") == job_id
            assert "queued" in first.text
        finally:
            ARTIFACTS.mkdir(exist_ok=True)
            browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))

    assert console_errors(browser) == []


# --- It reads at a glance ---------------------------------------------------------


def seed_hour(now: datetime) -> None:
    """Forty minutes of delivered jobs, a few milliseconds each, and one outlier.

    Published long enough ago to have expired: no claim below takes them.
    """
    jobs = []
    for minutes_ago in range(40, 2, -1):
        minute = now - timedelta(minutes=minutes_ago)
        count = 2 + (minutes_ago * 7) % 6
        for n in range(count):
            created = minute + timedelta(seconds=n * 7)
            latency = TYPICAL_MS * (1 + (n * 5 + minutes_ago) % 7 / 3)
            if minutes_ago % 9 == 0 and n == 0:
                latency = 180.0  # a slow client, now and then
            if minutes_ago == 12 and n == 0:
                latency = OUTLIER_MS
            delivered = created + timedelta(milliseconds=latency)
            pushed = n % 3 != 0 and latency != OUTLIER_MS
            jobs.append(
                Job(
                    job_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"{minutes_ago}/{n}")),
                    channel="1390012345678901234",
                    source="discord",
                    created_at=created,
                    expires_at=created + timedelta(minutes=2),
                    status=Job.Status.QUEUED if pushed else Job.Status.CLAIMED,
                    claimed_at=None if pushed else delivered,
                    claimed_by=None if pushed else "203.0.113.7",
                    delivered_at=delivered,
                    pushed_at=delivered if pushed else None,
                )
            )
    Job.objects.bulk_create(jobs)


def test_latency_legends_and_delivery_read_at_a_glance(
    live_gateway: LiveGateway, browser: Chrome
) -> None:
    base = live_gateway.base_url
    seed_hour(timezone.now())
    with httpx.Client(base_url=base, trust_env=False, timeout=5) as http:
        # Pulled only: no WebSocket client is connected yet.
        pulled = publish(http, live_gateway, "pulled-only")
        assert claim(http, live_gateway)["id"] == pulled["id"]
        # Pushed to a WebSocket client; the older of the two is then pulled too.
        headers = {"X-API-KEY": live_gateway.api_key}
        with connect(
            f"{live_gateway.ws_url}/ws", additional_headers=headers, proxy=None
        ) as ws:
            assert json.loads(ws.recv(timeout=5))["type"] == "hello"
            both = publish(http, live_gateway, "pushed-and-pulled")
            pushed = publish(http, live_gateway, "pushed-only")
            for job in (both, pushed):
                frame = json.loads(ws.recv(timeout=5))
                assert frame["type"] == "job" and frame["job"]["id"] == job["id"]
            assert claim(http, live_gateway)["id"] == both["id"]
        publish(http, live_gateway, "waiting")

    log_in(browser, base, "operator")
    expected = {
        "pulled-only": ("pull", "pulled"),
        "pushed-and-pulled": ("both", "pushed + pulled"),
        "pushed-only": ("push", "pushed"),
        "waiting": ("", "queued"),
    }

    def states(driver: Chrome) -> dict[str, tuple[str, str]]:
        shown = {}
        for job_id in expected:
            row = driver.find_element(By.CSS_SELECTOR, f'tr[data-job-id="{job_id}"]')
            state = row.find_element(By.CSS_SELECTOR, ".dash-state").text
            shown[job_id] = (row.get_attribute("data-delivered-by") or "", state)
        return shown

    for width in WIDTHS:
        set_width(browser, width)
        # A fresh load each time: the legends must show numbers before any hover.
        open_dashboard(browser, base)
        WebDriverWait(browser, RECORDED_WITHIN_SECONDS).until(
            lambda d: states(d) == expected
        )
        pushed_row = browser.find_element(
            By.CSS_SELECTOR, 'tr[data-job-id="pushed-only"]'
        )
        assert re.search(r"pushed \d+ s [\d.]+ m?s$", pushed_row.text), pushed_row.text
        waiting = browser.find_element(By.CSS_SELECTOR, 'tr[data-job-id="waiting"]')
        assert waiting.text.endswith("\N{EN DASH}")  # no client has it, no time

        # Log scale: the outlier at the top, a typical minute well above zero.
        scale = browser.execute_script(LATENCY_SCALE, [TYPICAL_MS, OUTLIER_MS])
        assert scale["distr"] == 3  # uPlot's log distribution
        assert scale["min"] <= 1 and scale["max"] >= OUTLIER_MS
        typical, outlier = scale["heights"]
        assert 0.9 <= outlier <= 1.0
        # 6 ms of 84 s, linear: 0.007 % of the height; on the log scale, over 10 %.
        assert typical > 0.1, scale
        # And drawn so: the p50 line's pixels stand clear of the plot's floor.
        assert pixels(browser, "#chart-latency", above=0.1) > 100

        # The legends show the latest minute's values on load, not "--".
        legends = browser.execute_script(LEGENDS)
        published, latency = legends["chart-published"], legends["chart-latency"]
        assert published["minute"].endswith("(latest)"), legends
        assert re.fullmatch(r"\d+", published["published"]), legends
        assert latency["minute"].endswith("(latest)"), legends
        for label in ("p50", "p90", "p99", "max"):
            assert re.fullmatch(r"[\d.]+ m?s", latency[label]), legends

        assert no_horizontal_scroll(browser)
        fit_height(browser)
        screenshot(browser, f"dashboard-{width}.png")

    # Hovered, a legend shows that minute; left, the latest again.
    over = browser.find_element(By.CSS_SELECTOR, "#chart-latency .u-over")
    ActionChains(browser).move_to_element(over).perform()
    hovered = browser.execute_script(LEGENDS)["chart-latency"]
    assert not hovered["minute"].endswith("(latest)"), hovered
    ActionChains(browser).move_to_element(
        browser.find_element(By.ID, "dash-status")
    ).perform()
    left = browser.execute_script(LEGENDS)["chart-latency"]
    assert left["minute"].endswith("(latest)"), left
    assert re.fullmatch(r"[\d.]+ m?s", left["p50"]), left

    assert console_errors(browser) == []


# --- The admin's job list ---------------------------------------------------------


def seed_job_list(now: datetime) -> None:
    """A page of jobs as the poller stores them: long ids, channels, addresses.

    Numbered as in a gateway that has stored a few million jobs.
    """
    jobs = []
    for n in range(30):
        created = now - timedelta(minutes=n * 37, seconds=n)
        claimed = n % 2 == 0
        jobs.append(
            Job(
                id=4_812_345 + n,
                job_id=str(uuid.uuid4()),
                place_id=109983668079237 + n,
                channel=f"13900123456789012{n:02d}",
                source="discord",
                message_id=f"13900987654321{n:05d}",
                title="Brainrot Notify",
                created_at=created,
                expires_at=created + timedelta(minutes=5),
                status=Job.Status.CLAIMED if claimed else Job.Status.QUEUED,
                claimed_at=created + timedelta(seconds=1) if claimed else None,
                claimed_by=(
                    "2001:db8:85a3::8a2e:370:7334" if n % 4 == 0 else "203.0.113.77"
                )
                if claimed
                else None,
            )
        )
    Job.objects.bulk_create(jobs)


def test_the_job_list_fits_1280_pixels(
    live_gateway: LiveGateway, browser: Chrome
) -> None:
    base = live_gateway.base_url
    seed_job_list(timezone.now())
    log_in(browser, base, "operator")
    for width in WIDTHS:
        # 900 px high: the screenshot shows the first rows, the test checks all.
        set_width(browser, width)
        browser.get(f"{base}/admin/jobs/job/")
        table = browser.find_element(By.ID, "result_list")
        results = table.find_element(By.XPATH, "..")
        # The table fits its box: nothing to scroll sideways, no column cut off.
        assert not overflows(browser, results)
        right = browser.execute_script(
            "return arguments[0].getBoundingClientRect().right", table
        )
        assert right <= width
        assert no_horizontal_scroll(browser)
        job_ids = table.find_elements(By.CSS_SELECTOR, "td.field-job_id")
        ages = table.find_elements(By.CSS_SELECTOR, "td.field-age")
        assert len(job_ids) == len(ages) == 30
        for cell in job_ids:
            assert lines(browser, cell) == 1, cell.text
            assert re.fullmatch(r"[0-9a-f-]{36}", cell.text)
        for cell in ages:
            assert lines(browser, cell) == 1, cell.text
            assert not overflows(browser, cell), cell.text
        # Every existing column is still there.
        headers = [
            th.text.strip().lower()
            for th in table.find_elements(By.CSS_SELECTOR, "thead th")
        ]
        for column in ("id", "job id", "place id", "channel", "source", "status"):
            assert column in headers, headers
        assert "age" in headers and "claimed by" in headers, headers
        if width == 1280:
            screenshot(browser, "admin-jobs-1280.png")

    assert console_errors(browser) == []

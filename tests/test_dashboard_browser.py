"""The dashboard in a real headless browser, against a real daphne process.

Debian's ``chromium``, driven by Selenium through Debian's ``chromium-driver``:
log in through the admin's form, follow the index's link, see the charts drawn,
and see a job published over signed HTTP appear within two seconds. The test
saves a screenshot to ``artifacts/dashboard.png``.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.contrib.auth.models import Permission, User

from gateway_client.signing import signed_headers
from tests.conftest import LiveGateway
from tests.servers import REPO_ROOT

try:
    from selenium.webdriver import Chrome, ChromeOptions, ChromeService
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # reported by the fixture: a skip here, a failure in CI
    Chrome = None  # type: ignore[assignment,misc]

pytestmark = [pytest.mark.backends, pytest.mark.processes]

SCREENSHOT = REPO_ROOT / "artifacts" / "dashboard.png"
PASSWORD = "a-long-test-password"
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
    "--window-size=1280,1500",
]
# The published bars' fill, "#417690" in dashboard.js: only a drawn series has it.
BAR_RGB = (0x41, 0x76, 0x90)
# The page polls once a second: a new job shows within two.
APPEARS_WITHIN_SECONDS = 2.0

COUNT_BAR_PIXELS = """
const canvas = document.querySelector(arguments[0] + " canvas");
if (!canvas) return -1;
const [r, g, b] = arguments[1];
const pixels = canvas.getContext("2d")
    .getImageData(0, 0, canvas.width, canvas.height).data;
let count = 0;
for (let i = 0; i < pixels.length; i += 4) {
    if (pixels[i] === r && pixels[i + 1] === g && pixels[i + 2] === b
        && pixels[i + 3] === 255) count++;
}
return count;
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


def publish(http: httpx.Client, gateway: LiveGateway, job_id: str) -> dict[str, Any]:
    headers = signed_headers(gateway.api_key, gateway.hmac_secret)
    response = http.post("/job", json={"job_id": job_id}, headers=headers)
    assert response.status_code == 201, response.text
    job: dict[str, Any] = response.json()["job"]
    return job


def bar_pixels(driver: Chrome) -> int:
    count: int = driver.execute_script(COUNT_BAR_PIXELS, "#chart-published", BAR_RGB)
    return count


def test_the_dashboard_draws_and_shows_a_new_job_within_two_seconds(
    live_gateway: LiveGateway, browser: Chrome
) -> None:
    staff_user("operator")
    base = live_gateway.base_url
    with httpx.Client(base_url=base, trust_env=False, timeout=5) as http:
        # Something to chart: three jobs, one of them delivered (claimed).
        for n in range(3):
            publish(http, live_gateway, f"before-{n}")
        claimed = http.get(
            "/job/next",
            headers=signed_headers(live_gateway.api_key, live_gateway.hmac_secret),
        )
        assert claimed.status_code == 200, claimed.text

        try:
            # The admin's own login form, then the index's link.
            browser.get(f"{base}/admin/login/?next=/admin/")
            browser.find_element(By.ID, "id_username").send_keys("operator")
            browser.find_element(By.ID, "id_password").send_keys(PASSWORD)
            browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
            WebDriverWait(browser, 10).until(
                lambda d: d.find_elements(By.LINK_TEXT, "Live dashboard")
            )
            browser.find_element(By.LINK_TEXT, "Live dashboard").click()
            WebDriverWait(browser, 10).until(
                lambda d: d.find_element(By.ID, "dash-status").text.startswith(
                    "Updated"
                )
            )
            assert browser.current_url == f"{base}/admin/dashboard/"

            # The published chart has drawn its bars, and the latency chart
            # its canvas.
            WebDriverWait(browser, 5).until(lambda d: bar_pixels(d) > 0)
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
            SCREENSHOT.parent.mkdir(exist_ok=True)
            browser.save_screenshot(str(SCREENSHOT))

    # No script failed on the page (the browser's own favicon request aside).
    console = browser.get_log("browser")  # type: ignore[no-untyped-call]  # Selenium
    errors = [
        entry["message"]
        for entry in console
        if entry["level"] == "SEVERE" and "favicon.ico" not in entry["message"]
    ]
    assert errors == []

"""The status page in a real headless Chromium (Debian's chromium + chromedriver, driven by selenium)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from tests.test_webhook_support import SECRET, digest_of, flaky_convert, permanent_convert, serve_app
from webhook.app import create_app
from webhook.config import Config, RetrySettings
from webhook.retry import RetryPolicy
from webhook.store import Intake, JobStore, NewJob
from webhook.worker import Worker, WorkerSettings

CHROMIUM = "/usr/lib/chromium/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            pytest.fail(f"{path} missing: apt-get install -y chromium chromium-driver (make test does)")
    profile = tempfile.mkdtemp(prefix="obd-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # Flags from test-infra.md §5: root needs --no-sandbox; the rest keep Chromium off the network.
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", f"--user-data-dir={profile}", "--window-size=1200,700"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def job(repo: str, tag: str) -> NewJob:
    return NewJob("127.0.0.1:5101", repo, tag, digest_of(repo + tag), tag + "_obd", "default")


def test_status_page_shows_converted_and_dead_jobs(tmp_path: Path, browser: webdriver.Chrome,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    store.record([Intake("distribution", "e1", job=job("team/web", "1.4"))])
    monkeypatch.setenv("OBD_TEST_FAILURES", "0")
    settings = WorkerSettings(lease_seconds=30)
    policy = RetryPolicy(RetrySettings(max_attempts=2))
    assert Worker(store, flaky_convert, policy, settings).run_once() is not None
    store.record([Intake("distribution", "e2", job=job("team/broken", "0.1"))])
    assert Worker(store, permanent_convert, policy, settings).run_once() is not None
    store.record([Intake("distribution", "e3", job=job("team/queued", "9"))])
    app = create_app(Config(data_dir=tmp_path, secrets=(SECRET,)), store=store)

    with serve_app(app) as base:
        browser.get(base + "/status")
        # No secret, no page (Chromium answers the Basic challenge with an empty document).
        assert browser.find_elements(By.ID, "jobs") == [] and "team/web" not in browser.page_source
        browser.execute_cdp_cmd("Network.enable", {})
        browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Bearer {SECRET}"}})
        browser.get(base + "/status")
        assert browser.title == "obd-webhook: conversions"
        rows = {r.get_attribute("data-state"): r.text for r in browser.find_elements(By.CSS_SELECTOR, "tr.job")}
        assert set(rows) == {"succeeded", "dead", "queued"}
        assert "team/web:1.4" in rows["succeeded"] and "1.4_obd" in rows["succeeded"]
        assert "unsupported image" in rows["dead"]
        browser.save_screenshot(str(tmp_path / "status.png"))
        assert (tmp_path / "status.png").stat().st_size > 5000

        browser.find_element(By.ID, "filter-dead").click()
        filtered = browser.find_elements(By.CSS_SELECTOR, "tr.job")
        assert [r.get_attribute("data-state") for r in filtered] == ["dead"]
        assert browser.current_url.endswith("/status?state=dead")

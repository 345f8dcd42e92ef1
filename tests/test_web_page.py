"""The page at GET / in headless chromium, against a live uvicorn over a tiny model and its index: a
user picked from the page's list is shown exactly the history, titles, categories and scores that
POST /recommend answers for them; so is a pasted history; an unknown user and unknown news ids show
the API's message.

Needs chromium and chromedriver (Debian: ``apt-get install chromium chromium-driver``). Without them
the test is skipped, except when ``CI`` is set: then it fails, so CI never passes without running it.
"""
from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, NoReturn

import httpx
import pytest

from newsrec.config import ServeConfig
from newsrec.serve.app import create_app
from newsrec.serve.service import Recommender
from tests.test_service import ServingFixture, latest_history, serving_dirs  # noqa: F401  (shared fixture)

LIMITS = ServeConfig(retrieve_k=50, default_k=5, max_k=20, max_history=30)
WAIT_S = 20.0  # longest wait for the page to load data or answer a click


def _unavailable(reason: str) -> NoReturn:
    """Skip, or fail when CI is set: a missing browser must not turn CI green."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so the browser test may not be skipped)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless chromium driven through the system's chromedriver (never a downloaded one)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("selenium is not installed (pip install -e .[dev])")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    found = {"chromium": chromium, "chromedriver": chromedriver}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        _unavailable(f"{' and '.join(missing)} not on PATH: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-proxy-server", "--window-size=1280,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base_url(serving_dirs: ServingFixture) -> Iterator[str]:  # noqa: F811
    """http://127.0.0.1:PORT of the real app under uvicorn, in a thread, for this module."""
    import uvicorn

    service = Recommender.load(serving_dirs.model_dir, serving_dirs.index_dir, serve_cfg=LIMITS)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service, LIMITS, save_on_shutdown=False),
                                           host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def api(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=WAIT_S, trust_env=False) as client:
        yield client


# ---------------------------------------------------------------------------- page helpers
def _wait(driver: Any, condition: Any, what: str) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S).until(condition, message=f"timed out waiting for {what}")


def _click_and_wait(driver: Any, button_id: str) -> str:
    """Click a button; return the page's state once the answer is shown ("done" or "error")."""
    from selenium.webdriver.common.by import By

    status = driver.find_element(By.ID, "status")
    driver.find_element(By.ID, button_id).click()
    _wait(driver, lambda d: status.get_attribute("data-state") in ("done", "error"), "the answer")
    return status.get_attribute("data-state")


def _column(driver: Any, table_id: str, cls: str) -> list[str]:
    """The exact text (textContent, whitespace kept) of a column's cells, top to bottom."""
    from selenium.webdriver.common.by import By

    cells = driver.find_elements(By.CSS_SELECTOR, f"#{table_id} tbody td.{cls}")
    return [cell.get_attribute("textContent") for cell in cells]


def _assert_page_shows(driver: Any, answer: dict) -> None:
    """The page shows exactly ``answer`` (a /recommend body): history and recommendations, in order."""
    from selenium.webdriver.common.by import By

    assert driver.find_element(By.ID, "error").get_attribute("textContent") == ""
    assert driver.find_element(By.ID, "results").is_displayed()
    assert _column(driver, "history-table", "title") == [news["title"] for news in answer["history"]]
    assert _column(driver, "history-table", "news-id") == [news["news_id"] for news in answer["history"]]
    assert _column(driver, "recs-table", "title") == [item["title"] for item in answer["items"]]
    assert _column(driver, "recs-table", "category") == [item["category"] for item in answer["items"]]
    shown = [float(score) for score in _column(driver, "recs-table", "score")]
    assert shown == pytest.approx([item["score"] for item in answer["items"]], rel=1e-3)  # 4 digits shown


def _open_page(driver: Any, base_url: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(base_url + "/")
    _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#sample-users option")) > 1,
          "the list of known users")


# ---------------------------------------------------------------------------- tests
def test_page_is_self_contained_html(api):
    r = api.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "<script>" in r.text and 'src="http' not in r.text and 'href="http' not in r.text
    users = api.get("/users", params={"limit": 3}).json()
    assert len(users["user_ids"]) == 3 and users["total"] >= 3
    bad = api.get("/users", params={"limit": 0})
    assert bad.status_code == 422 and "limit" in bad.json()["detail"]


def test_picked_user_sees_the_api_answer(browser, base_url, api, serving_dirs):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    _open_page(browser, base_url)
    select = Select(browser.find_element(By.ID, "sample-users"))
    listed = [option.get_attribute("value") for option in select.options][1:]
    assert listed == api.get("/users", params={"limit": 50}).json()["user_ids"]
    user = next(u for u in listed if len(latest_history(serving_dirs.dataset, u)) > 0)
    select.select_by_value(user)
    assert browser.find_element(By.ID, "user").get_attribute("value") == user

    assert _click_and_wait(browser, "by-user") == "done"
    answer = api.post("/recommend", json={"user_id": user}).json()
    assert len(answer["items"]) == LIMITS.default_k and answer["history_used"] > 0
    _assert_page_shows(browser, answer)


def test_unknown_user_shows_the_api_message(browser, base_url, api):
    from selenium.webdriver.common.by import By

    _open_page(browser, base_url)
    browser.find_element(By.ID, "user").send_keys("no-such-user")
    assert _click_and_wait(browser, "by-user") == "error"
    r = api.post("/recommend", json={"user_id": "no-such-user"})
    assert r.status_code == 404
    assert browser.find_element(By.ID, "error").get_attribute("textContent") == r.json()["detail"]
    assert not browser.find_element(By.ID, "results").is_displayed()


def test_pasted_history_and_unknown_ids(browser, base_url, api, serving_dirs):  # noqa: F811
    from selenium.webdriver.common.by import By

    dataset = serving_dirs.dataset
    history = [str(dataset.news_idx_to_id[i]) for i in (3, 1, 2)] + ["NX-unknown"]
    _open_page(browser, base_url)
    browser.find_element(By.ID, "history").send_keys(", ".join(history))
    assert _click_and_wait(browser, "by-history") == "error"
    refused = api.post("/recommend", json={"history": history})
    assert refused.status_code == 422 and "NX-unknown" in refused.json()["detail"]
    assert browser.find_element(By.ID, "error").get_attribute("textContent") == refused.json()["detail"]

    browser.find_element(By.ID, "ignore-unknown").click()
    assert _click_and_wait(browser, "by-history") == "done"
    answer = api.post("/recommend", json={"history": history, "ignore_unknown": True}).json()
    assert [news["news_id"] for news in answer["history"]] == history[:3]
    assert "NX-unknown" in browser.find_element(By.ID, "status").get_attribute("textContent")
    _assert_page_shows(browser, answer)

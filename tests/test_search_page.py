"""The search page of `siglip2-encoder serve`, in a real headless browser (Debian's chromium, driven by selenium):
typing a query shows the nearest images of the folder, in /search's order, each image loaded from the server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import httpx
import pytest
from conftest import free_port, wait_until_ready
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as DriverService
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from siglip2_encoder.cli import EXIT_OK, main


@pytest.fixture
def server(zero_shot_dir, photos, tmp_path):
    features = tmp_path / "features"
    folder = str(photos[0]).rsplit("/", 1)[0]
    assert main(["-q", "extract", folder, "--model", str(zero_shot_dir), "-o", str(features)]) == EXIT_OK
    port = free_port()
    command = [sys.executable, "-m", "siglip2_encoder.cli", "-q", "serve", "--model", str(zero_shot_dir)]
    command += ["--features", str(features), "--port", str(port)]
    process = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(f"{url}/ready", process, lambda: process.stderr.read().decode())
    yield url
    process.terminate()
    process.wait(timeout=30)


def chromium() -> webdriver.Chrome:
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert binary and driver, "Debian's chromium and chromium-driver are needed (README's test command installs them)"
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1200,900"):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(service=DriverService(driver), options=options)


def test_typing_a_query_shows_the_nearest_images(server, tmp_path):
    want = httpx.get(f"{server}/search", params={"q": "a red car", "k": 4}).json()["results"]
    browser = chromium()
    try:
        browser.get(server)
        browser.find_element(By.ID, "query").send_keys("a red car")
        k = browser.find_element(By.ID, "k")
        k.clear()
        k.send_keys("4")
        browser.find_element(By.ID, "go").click()
        WebDriverWait(browser, 30).until(
            expected_conditions.text_to_be_present_in_element((By.ID, "status"), "4 results")
        )
        figures = browser.find_elements(By.CSS_SELECTOR, "figure.result")
        assert [f.find_element(By.TAG_NAME, "img").get_attribute("alt") for f in figures] == [r["path"] for r in want]
        WebDriverWait(browser, 30).until(
            lambda b: all(
                b.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)
                for img in b.find_elements(By.CSS_SELECTOR, "figure.result img")
            )  # fmt: skip
        )
        browser.save_screenshot(str(tmp_path / "search.png"))
        assert (tmp_path / "search.png").stat().st_size > 10_000
    finally:
        browser.quit()
    assert httpx.get(f"{server}/image", params={"path": "/etc/passwd"}).status_code == 404  # only the folder's images

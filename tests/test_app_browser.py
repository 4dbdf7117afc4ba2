"""`jaxsr app` in a real browser: Debian's chromium, headless, driven by selenium
through chromedriver, against a server process on `jaxsr demo`'s random tiny weights.

A real photo uploaded at 4x gives a 4x picture in the page, one twice the size at 2x
gives 2x (the same size bucket: the program compiled for the first request serves
it); a text file renamed .png gives an error in the page, and the next upload still
works. The finished page is saved as a screenshot under the test's temporary folder,
and copied to $JAXSR_TEST_ARTIFACTS when that is set.

Needs chromium and chromedriver (.ci/run installs them where it can); without them
the test is skipped and says why."""

import os
import shutil
import time

import pytest

from tests.test_app_api import demo_weights, real_photo, running_app, shared_compile_cache

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
pytest.importorskip("gradio", reason="the app extra is not installed")
from selenium.webdriver.common.by import By  # noqa: E402

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,1400")
REQUEST_TIMEOUT = 400          # s: the first request compiles the sampling program


def _browser_binaries():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium "
                    "chromium-driver); the browser test cannot run")
    return chromium, driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, driver_path = _browser_binaries()
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait(what, condition, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _status(driver) -> str:
    return driver.find_element(By.ID, "status").text


def _request(driver, url, path, scale=None) -> str:
    """Open the page, upload `path`, pick the scale, press the button; the status line
    of this request."""
    driver.get(url)
    before = _wait("the page", lambda: driver.find_elements(By.CSS_SELECTOR,
                                                            "#upload input[type=file]"), 60)
    before[0].send_keys(str(path))
    _wait("the upload", lambda: driver.find_elements(
        By.CSS_SELECTOR, f"#upload [aria-label='{path.name}']"), 60)
    if scale is not None:
        driver.find_element(
            By.XPATH, f"//*[@id='upscale']//label[normalize-space()='{scale}']").click()
    first = _status(driver)
    driver.find_element(By.ID, "run").click()
    return _wait("the result", lambda: (s := _status(driver)) != first
                 and s.startswith("request") and s, REQUEST_TIMEOUT)


def _result_sizes(driver) -> list[tuple[int, int]]:
    """(width, height) of every picture in the results gallery, once loaded."""
    script = ("return Array.from(document.querySelectorAll('#results img'))"
              ".map(i => [i.naturalWidth, i.naturalHeight]);")
    return _wait("the result pictures", lambda: (sizes := driver.execute_script(script))
                 and all(w > 0 for w, _ in sizes) and [tuple(s) for s in sizes], 60)


def test_app_in_a_browser(browser, tmp_path_factory, tmp_path):
    root = tmp_path_factory.mktemp("app_browser")
    weights = demo_weights(root / "weights")
    small = real_photo(root / "cat.png", (32, 24))
    large = real_photo(root / "cat-large.png", (64, 48))
    notes = root / "notes.png"
    notes.write_text("this is text, not a picture\n")
    with running_app(weights, shared_compile_cache(tmp_path_factory), root) as url:
        status = _request(browser, url, small)
        assert "done" in status, status
        assert _result_sizes(browser) == [(128, 96)]                     # 4x 32x24
        slider = browser.execute_script(
            "return Array.from(document.querySelectorAll('#compare img')).length;")
        assert slider == 2                                 # bicubic | super-resolved

        status = _request(browser, url, large, scale=2)
        assert "done" in status and "warm program" in status, status
        assert _result_sizes(browser) == [(128, 96)]                     # 2x 64x48

        status = _request(browser, url, notes)
        assert "error" in status and "notes.png" in status and "not an image" in status, \
            status
        assert not browser.find_elements(By.CSS_SELECTOR, "#results img")

        status = _request(browser, url, small)
        assert "done" in status, status
        assert _result_sizes(browser) == [(128, 96)]
        value = "return document.querySelector('#{} textarea').value;"
        assert browser.execute_script(value.format("prompt-used")).endswith(
            "clean, high-resolution, 8k")
        assert browser.execute_script(value.format("time-taken")).endswith(" s")
        browser.execute_script("window.scrollTo(0, 0);")
        shot = tmp_path / "app_screenshot.png"
        assert browser.save_screenshot(str(shot))
    if os.environ.get("JAXSR_TEST_ARTIFACTS"):
        folder = os.environ["JAXSR_TEST_ARTIFACTS"]
        os.makedirs(folder, exist_ok=True)
        shutil.copy(shot, os.path.join(folder, shot.name))

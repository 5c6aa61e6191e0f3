"""The page of `transduce serve` in a real headless Chromium (Debian's chromium and chromium-driver,
driven by Selenium): type a word, submit, see translate's output and the attention heatmap.

TRANSDUCE_SCREENSHOT=PATH also writes the screenshot there (docs/serve_page.png is made so, with
the G2P run: see docs/serving.md)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the 'serve' extra is not installed")
selenium = pytest.importorskip("selenium", reason="selenium is not installed (the dev extra)")

from serving import Server  # noqa: E402
from toyrun import toy_run  # noqa: E402

CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM.exists() and DRIVER.exists()),
                                reason="no Chromium here: apt-get install -y chromium chromium-driver")


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)  # Debian's: Selenium Manager downloads nothing
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,1200"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=str(DRIVER)), options=options)
    yield driver
    driver.quit()


def page_output(browser, url: str, word: str, beam: str | None = None) -> tuple[str, bool]:
    """Type `word` on the page at `url`, submit, and read (the output shown, whether a heatmap is drawn)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(url + "/")
    wait = WebDriverWait(browser, 30)
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#model option")))
    if beam is not None:
        Select(browser.find_element(By.ID, "beam")).select_by_visible_text(beam)
    box = browser.find_element(By.ID, "inputs")
    box.clear()
    box.send_keys(word)
    browser.find_element(By.ID, "submit").click()
    shown = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#outputs li .output")))
    heatmap = browser.find_element(By.ID, "attention-section").is_displayed()
    return shown.text, heatmap


def test_page_shows_the_translation_and_its_attention(browser, tmp_path):
    import httpx

    run = Path(os.environ.get("TRANSDUCE_SCREENSHOT_RUN") or toy_run(tmp_path, max_steps=80))
    word = os.environ.get("TRANSDUCE_SCREENSHOT_WORD", "a b c d")
    with Server("--model", str(run), "--threads", "1") as s:
        shown, heatmap = page_output(browser, s.url, word, beam="4")
        want = httpx.post(s.url + "/v1/translate", json={"inputs": [word], "beam": 4}).json()["outputs"][0]["text"]
        shot = tmp_path / "serve_page.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 1000
    from transduce.cli import main
    import io
    from contextlib import redirect_stdout

    (tmp_path / "in.txt").write_text(word + "\n")
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["translate", "--model", str(run), "--beam", "4", "--input", str(tmp_path / "in.txt")]) == 0
    assert shown == want == out.getvalue().rstrip("\n")
    assert heatmap
    if os.environ.get("TRANSDUCE_SCREENSHOT"):
        shutil.copy(shot, os.environ["TRANSDUCE_SCREENSHOT"])

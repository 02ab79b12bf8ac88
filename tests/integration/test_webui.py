"""The web UI (omnigen2.webui, a Gradio client of the SDK) in a real browser: Debian's headless Chromium, driven
through chromium-driver by selenium, against the served stack.

Chromium is a system package (`apt-get install chromium chromium-driver`; .ci/run installs it): without it these
tests fail, naming what to install, rather than skip.
OMNIGEN2_WEBUI_SCREENSHOT=docs/images/webui.png also writes the README's screenshot there.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from omnigen2 import OmniGen2Client
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from serving.frontend.process import FrontendProcess
from serving.triton.cpu_lane import CpuLane
from serving.triton.launcher import TritonServer
from serving.triton.ports import LOOPBACK, free_port
from tests.integration.triton_stats import executions, requests_running

# The UI's starting values: small and fast on the tiny checkpoint.
UI_ARGS = ("--width", "64", "--height", "48", "--steps", "4")
PROMPT = "A red apple on a wooden table"
# The progress test's steps (about 2 s on the tiny model): the test holds the run on the CPU lane after its first
# step until the bar shows it (on a loaded 2-core CI machine every progress message of an unheld 24-step run, 0.4 s,
# once reached the browser with the result); the rest of the run is the time the test has to take the lane.
PROGRESS_STEPS = 100
# Records every text that elements matching a selector show, so what a fast generation shows is not missed between
# polls.
WATCH = """
window.seen = [];
new MutationObserver(() => {
  for (const element of document.querySelectorAll(arguments[0])) {
    const text = element.textContent.trim();
    if (text && !window.seen.includes(text)) window.seen.push(text);
  }
}).observe(document.body, {subtree: true, childList: true, characterData: true});
"""


def _browser_binaries() -> tuple[str, str]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.fail(
            "the web UI tests need Debian's headless Chromium and its driver (chromium: "
            f"{chromium or 'missing'}, chromedriver: {driver or 'missing'}): "
            "apt-get install chromium chromium-driver (.ci/run does)",
            pytrace=False,
        )
    return chromium, driver


@pytest.fixture(scope="module")
def webui(api: FrontendProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m omnigen2.webui` as a user starts it, pointed at the served API; yields the page's address."""
    work = tmp_path_factory.mktemp("webui")
    port = free_port()
    env = os.environ | {"GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(work / "files")}
    command = [sys.executable, "-m", "omnigen2.webui", f"--server={api.address}", f"--port={port}", *UI_ARGS]
    url = f"http://{LOOPBACK}:{port}/"
    with (work / "webui.log").open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"web UI exited with {process.returncode}:\n{(work / 'webui.log').read_text()}")
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"web UI not answering:\n{(work / 'webui.log').read_text()}") from None
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(30)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    chromium, driver = _browser_binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # No sandbox as root; no background connections (the machine's network is closed).
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    session = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield session
    finally:
        session.quit()


@pytest.fixture
def page(browser: WebDriver, webui: str) -> WebDriver:
    browser.get(webui)
    WebDriverWait(browser, 60).until(expected_conditions.element_to_be_clickable((By.ID, "generate-button")))
    return browser


@pytest.fixture(scope="module")
def client(api: FrontendProcess) -> OmniGen2Client:
    return OmniGen2Client(api.address, timeout=120)


def wait_for(page: WebDriver, css: str, timeout: float = 60.0) -> WebElement:
    try:
        element: WebElement = WebDriverWait(page, timeout).until(
            expected_conditions.visibility_of_element_located((By.CSS_SELECTOR, css))
        )
    except TimeoutException:
        toasts = [toast.text for toast in page.find_elements(By.CSS_SELECTOR, ".toast-body")]
        raise AssertionError(f"{css} never appeared; the page's messages: {toasts}") from None
    return element


def type_into(field: WebElement, text: str) -> None:
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(text, Keys.TAB)  # Tab: leave the field, so Gradio takes the value


def fetch_image(element: WebElement) -> Image.Image:
    with urllib.request.urlopen(element.get_attribute("src"), timeout=10) as response:
        image = Image.open(io.BytesIO(response.read()))
        image.load()
    return image


def test_generate_in_the_browser_shows_the_served_image(
    page: WebDriver, client: OmniGen2Client, triton: TritonServer, tmp_path: Path
) -> None:
    """Type a prompt, set a seed and the steps in the advanced settings, click Generate: the progress bar follows
    the denoising steps and the gallery shows the image the SDK gets for the same request, pixel for pixel. The run
    is held on the CPU lane (the transformer takes it for each step) from its first step until the bar has shown
    it, so the bar is seen mid-run however fast or loaded the machine (see PROGRESS_STEPS)."""
    page.find_element(By.CSS_SELECTOR, "#generate-prompt textarea").send_keys(PROMPT)
    page.find_element(By.CSS_SELECTOR, "#generate-settings button").click()  # open the accordion
    type_into(wait_for(page, "#generate-seed input"), "7")
    type_into(wait_for(page, "#generate-steps input"), str(PROGRESS_STEPS))
    page.execute_script(WATCH, ".progress-level, .progress-text")
    lane, steps = CpuLane(triton.model_repository, enabled=True), executions(triton, "transformer")
    page.find_element(By.ID, "generate-button").click()
    deadline = time.monotonic() + 60
    while executions(triton, "transformer") == steps:
        assert time.monotonic() < deadline, "the run never took a step"
        time.sleep(0.005)
    with lane:  # a step done and 99 to go: no further one until the bar has shown it
        assert requests_running(triton) == 1, "the run ended before the lane was taken"
        with contextlib.suppress(TimeoutException):  # the assertion below names what the bar showed instead
            WebDriverWait(page, 30).until(lambda _: "Denoising" in " ".join(page.execute_script("return window.seen")))

    shown = wait_for(page, "#generate-gallery img")
    WebDriverWait(page, 30).until(lambda _: "Seed 7" in page.find_element(By.ID, "generate-status").text)
    assert "12 output tokens" in page.find_element(By.ID, "generate-status").text  # 64x48 px: 4x3 patches
    screenshot = tmp_path / "webui-generate.png"
    assert page.save_screenshot(str(screenshot)) and Image.open(screenshot).size[0] > 0
    if target := os.environ.get("OMNIGEN2_WEBUI_SCREENSHOT"):
        shutil.copyfile(screenshot, target)

    progress = page.execute_script("return window.seen")
    shown_texts = " | ".join(progress)  # whole, where pytest would cut a list's repr short
    assert any("Denoising" in text for text in progress), shown_texts
    assert any(f"/{PROGRESS_STEPS} steps" in text for text in progress), shown_texts  # the request's steps
    expected = client.generate(PROMPT, width=64, height=48, steps=PROGRESS_STEPS, seed=7).images[0]
    assert np.array_equal(np.asarray(fetch_image(shown).convert("RGB")), np.asarray(expected))


def test_previews_every_n_steps(page: WebDriver) -> None:
    """With previews on, the gallery shows the estimate on the steps asked for (and the last), then the result."""
    page.find_element(By.CSS_SELECTOR, "#generate-prompt textarea").send_keys(PROMPT)
    page.find_element(By.CSS_SELECTOR, "#generate-settings button").click()
    wait_for(page, "#generate-previews input[type=checkbox]").click()
    type_into(page.find_element(By.CSS_SELECTOR, "#generate-preview_every input"), "3")
    page.execute_script(WATCH, "#generate-status")
    page.find_element(By.ID, "generate-button").click()
    WebDriverWait(page, 60).until(lambda _: "Seed" in page.find_element(By.ID, "generate-status").text)
    shown = " ".join(page.execute_script("return window.seen"))  # the block's texts, its progress bar's included
    assert sorted(set(re.findall(r"Step \d+ of \d+ \(preview\)", shown))) == [
        "Step 3 of 4 (preview)",
        "Step 4 of 4 (preview)",
    ]


def test_step_cache_is_asked_for_and_reported(page: WebDriver) -> None:
    page.find_element(By.CSS_SELECTOR, "#generate-prompt textarea").send_keys(PROMPT)
    page.find_element(By.CSS_SELECTOR, "#generate-settings button").click()
    wait_for(page, "#generate-cache input").click()
    wait_for(page, "li[role=option][aria-label=taylorseer]").click()
    page.find_element(By.ID, "generate-button").click()
    WebDriverWait(page, 60).until(lambda _: "Seed" in page.find_element(By.ID, "generate-status").text)
    assert "step cache taylorseer" in page.find_element(By.ID, "generate-status").text


def test_server_refusal_shows_on_the_page(page: WebDriver) -> None:
    """The server's validation is the page's: an empty prompt comes back as INVALID_ARGUMENT naming the field."""
    page.find_element(By.ID, "generate-button").click()
    toast = wait_for(page, ".toast-body.error")
    assert "INVALID_ARGUMENT" in toast.text and "prompt" in toast.text


def test_edit_uploads_an_image_and_keeps_its_size(page: WebDriver, golden: Path) -> None:
    source = golden / "edit_one_image_input0.png"
    page.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Edit')]").click()
    page.find_element(By.CSS_SELECTOR, "#edit-image-1 input[type=file]").send_keys(str(source))
    wait_for(page, "#edit-image-1 img")  # uploaded
    page.find_element(By.CSS_SELECTOR, "#edit-prompt textarea").send_keys("Make it night")
    page.find_element(By.ID, "edit-button").click()
    shown = wait_for(page, "#edit-gallery img")
    with Image.open(source) as original:
        assert fetch_image(shown).size == original.size  # no size set: the edited image's own


def test_compose_takes_several_images(page: WebDriver, golden: Path) -> None:
    page.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Compose')]").click()
    for slot, name in ((1, "edit_one_image_input0.png"), (3, "in_context_two_images_input1.png")):
        page.find_element(By.CSS_SELECTOR, f"#compose-image-{slot} input[type=file]").send_keys(str(golden / name))
        wait_for(page, f"#compose-image-{slot} img")
    page.find_element(By.CSS_SELECTOR, "#compose-prompt textarea").send_keys("The first image inside the second")
    page.find_element(By.ID, "compose-button").click()
    shown = wait_for(page, "#compose-gallery img")
    assert fetch_image(shown).size == (64, 48)  # the panel's starting size


def test_chat_streams_an_answer_about_an_image(page: WebDriver, client: OmniGen2Client, golden: Path) -> None:
    source = golden / "edit_one_image_input0.png"
    page.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Chat')]").click()
    page.find_element(By.CSS_SELECTOR, "#chat-settings button").click()
    type_into(wait_for(page, "#chat-max_new_tokens input[type=number]"), "6")
    page.find_element(By.CSS_SELECTOR, "#chat-message input[type=file]").send_keys(str(source))
    question = page.find_element(By.CSS_SELECTOR, "#chat-message textarea")
    question.send_keys("What is in the picture?")
    WebDriverWait(page, 10).until(lambda _: page.find_elements(By.CSS_SELECTOR, "#chat-message img"))
    question.send_keys(Keys.ENTER)

    WebDriverWait(page, 60).until(lambda _: "tokens (" in page.find_element(By.ID, "chat-status").text)
    expected = client.understand("What is in the picture?", [source], max_new_tokens=6)
    status = page.find_element(By.ID, "chat-status").text
    assert status.startswith(f"{expected.completion_tokens} tokens ({expected.finish_reason})"), status
    assert f"prompt {expected.prompt_tokens} tokens" in status  # the image went with the question

"""The chat page in a real headless Chromium, against a live server on the bundled demo model:
choose a picture, ask, watch the answer stream in, follow up, stop an answer, start over.

Skips with the reason where no browser can be had (scripts/install_browser.sh installs
Debian's chromium + chromedriver and selenium). Set MLX_LLAVA_PAGE_SCREENSHOT=PATH to save a
screenshot of the conversation (docs/server_page.png was made so).
"""

from __future__ import annotations

import os

import httpx
import pytest

from llava_testing.serving import EXAMPLES, WorkerGate, chromium_driver, serving, wait_until
from mlx_llava import ChatSession, load

pytest.importorskip("selenium", reason="the browser test needs selenium (install_browser.sh)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver, reason = chromium_driver(tmp_path_factory.mktemp("chromium-profile"))
    if driver is None:
        pytest.skip(reason)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def demo():
    return load("demo")


@pytest.fixture(scope="module")
def server(demo):
    with serving(demo, model_id="demo") as live:
        yield live


QUESTIONS = ["What color is the shape?", "What shape is this?", "Describe the image."] + [
    "Describe the image."
]


def answers(browser):
    return browser.find_elements(By.CSS_SELECTOR, ".message.assistant")


def ask(browser, text):
    box = browser.find_element(By.ID, "prompt")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def finished(browser, n, timeout=30):
    """Wait until the n-th answer is done (or stopped); return (state, text)."""

    def done():
        found = answers(browser)
        if len(found) >= n and found[n - 1].get_attribute("data-state") in ("done", "stopped"):
            return found[n - 1]
        return None

    answer = wait_until(done, timeout=timeout)
    return answer.get_attribute("data-state"), answer.find_element(By.CLASS_NAME, "text").text


def test_chat_page_in_a_real_browser(browser, server, demo):
    # What the model answers in this conversation (ChatSession: the same rendering and cache).
    session = ChatSession(*demo, image=str(EXAMPLES / "red_circle.png"))
    expected = [session.send(q) for q in QUESTIONS]
    assert expected[:2] == ["red", "circle"] and len(expected[3].split()) > 1

    browser.get(server.url + "/")
    wait_until(lambda: browser.find_element(By.ID, "model").text == "demo")

    # Choose a picture: it is previewed, then sent with the question.
    browser.find_element(By.ID, "file").send_keys(str(EXAMPLES / "red_circle.png"))
    preview = browser.find_element(By.ID, "preview")
    wait_until(lambda: (preview.get_attribute("src") or "").startswith("data:image/png"))
    assert browser.find_element(By.ID, "attachment").is_displayed()
    ask(browser, QUESTIONS[0])
    assert finished(browser, 1) == ("done", expected[0])
    assert not browser.find_element(By.ID, "attachment").is_displayed()
    sent = browser.find_elements(By.CSS_SELECTOR, ".message.user img")
    assert len(sent) == 1 and sent[0].get_attribute("src").startswith("data:image/png")

    # A follow-up in the same conversation: the whole chat is sent, the server's cache reused.
    ask(browser, QUESTIONS[1])
    assert finished(browser, 2) == ("done", expected[1])
    meta = answers(browser)[1].find_element(By.CLASS_NAME, "meta").text
    assert "tokens/s" in meta or "token" in meta
    assert "prompt tokens cached" in meta
    if os.environ.get("MLX_LLAVA_PAGE_SCREENSHOT"):
        browser.save_screenshot(os.environ["MLX_LLAVA_PAGE_SCREENSHOT"])

    # Watch a longer answer stream in: the worker stands still after its second step, the page
    # shows the words so far, then the answer goes on to its end in the same place.
    with WorkerGate(server.worker) as gate:
        gate.hold("step")
        ask(browser, QUESTIONS[2])
        gate.wait_held()
        gate.step()
        answer = wait_until(lambda: len(answers(browser)) == 3 and answers(browser)[2], timeout=30)
        text = answer.find_element(By.CLASS_NAME, "text")
        part = wait_until(lambda: text.text, timeout=30)
        assert answer.get_attribute("data-state") not in ("done", "stopped")
        assert expected[2].startswith(part) and part != expected[2]
        gate.release()
    assert finished(browser, 3) == ("done", expected[2])
    assert text.text == expected[2]  # it grew in place

    # Stop an answer after its first word: it ends there, and the server frees its slot.
    with WorkerGate(server.worker) as gate:
        gate.hold("step")
        ask(browser, QUESTIONS[3])
        gate.wait_held()  # the first step: a word, then the worker stands still
        [number] = gate.admitted
        wait_until(lambda: answers(browser)[3].get_attribute("data-chunks"), timeout=30)
        browser.find_element(By.ID, "stop").click()
        state, text = finished(browser, 4)
        assert state == "stopped"
        assert text and expected[3].startswith(text) and text != expected[3]
        assert "stopped" in answers(browser)[3].find_element(By.CLASS_NAME, "meta").text
        gate.wait(lambda: number in gate.cancelled)  # the server heard of it
        gate.release()
        assert gate.wait(lambda: gate.finished.get(number)) == "cancelled"
    assert httpx.get(server.url + "/health").json()["active"] == 0
    assert browser.find_element(By.ID, "send").is_displayed()

    # A new chat starts empty.
    browser.find_element(By.ID, "new-chat").click()
    assert answers(browser) == [] and browser.find_element(By.ID, "empty").is_displayed()
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []

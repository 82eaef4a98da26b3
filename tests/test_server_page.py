"""The chat page in a real headless Chromium, against a live server on the bundled demo model:
choose a picture, ask, watch the answer stream in, follow up, stop an answer, start over; and
on the tiny LLaVA-NeXT-Video checkpoint, a video (written with PyAV) asked about the same way.

Skips with the reason where no browser can be had (scripts/install_browser.sh installs
Debian's chromium + chromedriver and selenium). Set MLX_LLAVA_PAGE_SCREENSHOT=PATH to save a
screenshot of the conversation (docs/server_page.png was made so).
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from llava_testing.serving import EXAMPLES, WorkerGate, chromium_driver, serving, wait_until
from llava_testing.videos import video_url, write_clip
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


# Videos ------------------------------------------------------------------------------------

VIDEO_MODEL = Path(__file__).parent / "fixtures" / "data" / "nv-hub"  # LLaVA-NeXT-Video
VIDEO_QUESTIONS = ["What happens in the video?", "Why?"]
VIDEO_MAX_TOKENS = 12
VIDEO_MAX_BODY_MB = 0.025  # 26,214 bytes: the small clip fits, the long one does not


@pytest.fixture(scope="module")
def video_model():
    return load(VIDEO_MODEL, dtype="float32")


def text_of(element) -> str:
    """An element's text exactly as the page wrote it (the random model's answers hold
    characters that the rendered text would drop)."""
    return element.get_property("textContent")


def test_a_video_in_a_real_browser(browser, video_model, tmp_path):
    """On a model that sees videos the page takes a video file: it shows its first frame, sends
    it as a `video_url` part, and the answer streams in as `ChatSession(video=...)` gives it;
    the follow-up resends it (cached by the server). A file that would make the request larger
    than --max-body-mb is refused at once, saying so."""
    clip = write_clip(tmp_path / "clip.webm", seed=0)  # VP8: a browser plays it
    long_clip = write_clip(tmp_path / "long.webm", seed=1, frames=40)
    limit = VIDEO_MAX_BODY_MB * (1 << 20)
    assert clip.stat().st_size * 4 / 3 + 4096 < limit < long_clip.stat().st_size * 4 / 3
    chat = ChatSession(*video_model, video=clip)
    first = [r.text for r in chat.stream(VIDEO_QUESTIONS[0], max_tokens=VIDEO_MAX_TOKENS)]
    second = chat.send(VIDEO_QUESTIONS[1], max_tokens=VIDEO_MAX_TOKENS)
    shown = next(k for k in range(1, len(first)) if "".join(first[:k]))  # steps to a first text
    assert "".join(first[:shown]) != "".join(first) != second

    with serving(video_model, model_id="nv-hub", max_body_mb=VIDEO_MAX_BODY_MB) as server:
        browser.get(server.url + "/")
        file = browser.find_element(By.ID, "file")
        wait_until(lambda: "video/*" in file.get_attribute("accept"), timeout=30)
        wait_until(lambda: browser.find_element(By.ID, "model").text == "nv-hub")
        assert "picture or video" in browser.find_element(By.ID, "empty").text
        browser.find_element(By.ID, "settings-toggle").click()
        browser.find_element(By.ID, "max-tokens").clear()
        browser.find_element(By.ID, "max-tokens").send_keys(str(VIDEO_MAX_TOKENS))
        browser.find_element(By.ID, "settings-toggle").click()

        # Too large for the server: refused before anything is sent, with the limit named.
        file.send_keys(str(long_clip))
        status = browser.find_element(By.ID, "status")
        wait_until(lambda: "--max-body-mb" in status.text)
        assert "over the server's limit of 25.6 KB a request" in status.text
        assert not browser.find_element(By.ID, "attachment").is_displayed()

        # A format the browser cannot play (MPEG-4 part 2) is named instead; then removed.
        file.send_keys(str(write_clip(tmp_path / "clip.mp4", seed=0)))
        note = browser.find_element(By.ID, "attachment-note")
        video = browser.find_element(By.ID, "preview-video")
        wait_until(lambda: "no preview" in note.text, timeout=30)
        assert note.text.startswith("clip.mp4") and not video.is_displayed()
        browser.find_element(By.ID, "remove-picture").click()
        assert not browser.find_element(By.ID, "attachment").is_displayed()

        # The clip: its first frame is shown (the browser decoded it), then it is sent.
        file.send_keys(str(clip))
        wait_until(lambda: video.get_attribute("data-ready") == "true", timeout=30)
        assert video.is_displayed() and browser.find_element(By.ID, "attachment").is_displayed()
        assert note.text == "clip.webm"
        frame = browser.execute_script(
            "const v = arguments[0]; return [v.readyState, v.videoWidth, v.paused, v.currentTime]",
            video,
        )
        assert frame == [frame[0], 32, True, 0] and frame[0] >= 2  # HAVE_CURRENT_DATA
        assert video.get_attribute("src").startswith("data:video/webm;base64,")
        assert browser.find_element(By.ID, "status").text == ""

        # The answer streams in: the worker stands still after the step that shows a first
        # text, the page shows what the library's stream had by then, then all of it.
        with WorkerGate(server.worker) as gate:
            gate.hold("step")
            ask(browser, VIDEO_QUESTIONS[0])
            gate.wait_held()
            for _ in range(shown):  # a row's tokens are read a step late: k steps, k - 1
                gate.step()
            answer = wait_until(lambda: answers(browser) and answers(browser)[0], timeout=30)
            box = answer.find_element(By.CLASS_NAME, "text")
            wait_until(lambda: text_of(box) == "".join(first[:shown]), timeout=30)
            assert answer.get_attribute("data-state") == "streaming"
            gate.release()
        wait_until(lambda: answer.get_attribute("data-state") in ("done", "stopped", "error"))
        assert answer.get_attribute("data-state") == "done"
        assert text_of(box) == "".join(first)
        sent = browser.find_elements(By.CSS_SELECTOR, ".message.user video")
        assert len(sent) == 1 and sent[0].get_attribute("src") == video_url(clip)  # the file
        assert not browser.find_element(By.ID, "attachment").is_displayed()

        # A follow-up resends the video: the library's answer, the video's tokens cached.
        ask(browser, VIDEO_QUESTIONS[1])
        wait_until(lambda: len(answers(browser)) == 2)
        wait_until(lambda: answers(browser)[1].get_attribute("data-state") in ("done", "error"))
        follow = answers(browser)[1]
        assert text_of(follow.find_element(By.CLASS_NAME, "text")) == second
        meta = follow.find_element(By.CLASS_NAME, "meta").text
        cached = int(meta.split(" of ")[0].split()[-1])
        assert cached > video_model[0].config.video_tokens(8), meta
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


def test_a_model_without_videos_is_not_offered_one(browser, server, tmp_path):
    """The demo model sees pictures only: the file chooser asks for pictures, and a video
    dropped on the page anyway is refused with the reason, nothing sent."""
    clip = write_clip(tmp_path / "clip.webm")
    browser.get(server.url + "/")
    wait_until(lambda: browser.find_element(By.ID, "model").text == "demo")
    file = browser.find_element(By.ID, "file")
    assert file.get_attribute("accept") == "image/*"
    assert "video" not in browser.find_element(By.ID, "empty").text
    with WorkerGate(server.worker) as gate:
        file.send_keys(str(clip))
        status = browser.find_element(By.ID, "status")
        wait_until(lambda: "does not see videos" in status.text)
        assert not browser.find_element(By.ID, "attachment").is_displayed()
        assert gate.submitted == 0

"""The server takes videos (OpenAI `video_url` parts) on OneVision and NeXT-Video: answers as
`ChatSession(video=...)`, plain and streamed, a follow-up about the same video computes only
its new tokens, files and URLs under the pictures' policy, bad videos a 400. The clips are
written with PyAV (`llava_testing.videos`: 8 frames of 32x32 noise)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

pytest.importorskip("av")

from llava_testing.serving import WorkerGate, serving  # noqa: E402
from llava_testing.videos import video_turn, video_url, write_clip  # noqa: E402
from mlx_llava import ChatSession, load  # noqa: E402

DATA = Path(__file__).parent / "fixtures" / "data"


def post(server, messages, **fields) -> httpx.Response:
    body = {"messages": messages, "temperature": 0, "max_tokens": 6, **fields}
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)


def streamed(server, messages) -> str:
    response = post(server, messages, stream=True)
    assert response.status_code == 200, response.text
    text = ""
    for line in response.text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            for choice in json.loads(line[6:])["choices"]:
                text += choice["delta"].get("content") or ""
    return text


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    return write_clip(folder / "a.mp4", 0), write_clip(folder / "b.mp4", 1)


@pytest.mark.parametrize("name", ["ov-hub", "nv-hub"])
def test_a_video_is_answered_as_a_chat_session_and_reused_next_turn(name, clips):
    model, processor = loaded = load(DATA / name, dtype="float32")
    clip = clips[0]
    chat = ChatSession(model, processor, video=clip)
    first, second = chat.send("What happens?", max_tokens=6), chat.send("Then?", max_tokens=6)
    other = ChatSession(model, processor, video=clips[1]).send("What happens?", max_tokens=6)
    assert other != first or name == "ov-hub"  # (the tiny OneVision answers alike)
    with serving(loaded, image_dir=str(clip.parent)) as server:
        turn = [video_turn("What happens?", video_url(clip))]
        response = post(server, turn).json()
        assert response["choices"][0]["message"]["content"] == first
        assert streamed(server, turn) == first
        by_path = [video_turn("What happens?", clip.name)]  # a file inside --image-dir
        assert post(server, by_path).json()["choices"][0]["message"]["content"] == first
        follow = turn + [
            {"role": "assistant", "content": first},
            {"role": "user", "content": "Then?"},
        ]
        response = post(server, follow).json()
        assert response["choices"][0]["message"]["content"] == second
        usage = response["usage"]
        video_tokens = model.config.video_tokens(8)
        cached = usage["prompt_tokens_details"]["cached_tokens"]
        assert video_tokens < cached < usage["prompt_tokens"]
        other_turn = [video_turn("What happens?", video_url(clips[1]))]
        response = post(server, other_turn).json()  # not mistaken for the cached video
        assert response["choices"][0]["message"]["content"] == other
        assert response["usage"]["prompt_tokens_details"]["cached_tokens"] < video_tokens


def test_frames_flag_and_bad_videos(clips, tmp_path):
    model, processor = loaded = load(DATA / "nv-hub", dtype="float32")
    want = ChatSession(model, processor, video=clips[0], num_frames=4).send("Hi", max_tokens=6)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    with serving(loaded, num_frames=4, max_body_mb=2) as server:
        health = httpx.get(server.url + "/health").json()  # what the page offers
        assert (health["inputs"], health["max_body_bytes"]) == (["text", "image", "video"], 2 << 20)
        turn = [video_turn("Hi", video_url(clips[0]))]
        assert post(server, turn).json()["choices"][0]["message"]["content"] == want
        cases = {
            video_url(broken): "cannot read video data URL",
            "data:image/png;base64,AAAA": "not a video",
            "https://example.com/a.mp4": "video URLs are refused",
            "a.mp4": "local picture paths are refused",
        }
        for url, message in cases.items():
            response = post(server, [video_turn("Hi", url)])
            assert response.status_code == 400, url
            assert message in response.json()["error"]["message"], url
    pictures_only = load(DATA / "hf-hub", dtype="float32")
    with serving(pictures_only) as server:
        assert httpx.get(server.url + "/health").json()["inputs"] == ["text", "image"]
        response = post(server, [video_turn("Hi", video_url(clips[0]))])
        assert response.status_code == 400
        assert "does not see videos" in response.json()["error"]["message"]


def test_video_urls_and_files_are_fetched_under_the_pictures_limits(clips, tmp_path):
    import functools
    import http.server
    import threading

    model, processor = loaded = load(DATA / "nv-hub", dtype="float32")
    want = ChatSession(model, processor, video=clips[0]).send("Hi", max_tokens=6)
    folder = clips[0].parent
    big = write_clip(folder / "big.mp4", 3, frames=40)
    limit = (clips[0].stat().st_size + big.stat().st_size) / 2
    assert clips[0].stat().st_size < limit < big.stat().st_size
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    host = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{host.server_address[1]}"
    settings = dict(allow_remote_images=True, allow_private_image_hosts=True)
    try:
        with serving(
            loaded, image_dir=str(folder), max_image_mb=limit / (1 << 20), **settings
        ) as s:
            for source in (f"{url}/a.mp4", "a.mp4"):
                answer = post(s, [video_turn("Hi", source)]).json()
                assert answer["choices"][0]["message"]["content"] == want, source
            for source in (f"{url}/big.mp4", "big.mp4"):
                response = post(s, [video_turn("Hi", source)])
                assert response.status_code == 400, source
                assert "more than the limit" in response.json()["error"]["message"], source
    finally:
        host.shutdown()
        host.server_close()


def test_a_video_asked_about_twice_at_once_is_prefilled_once(clips):
    """Two questions about one video that arrive together: the second waits a turn and
    starts from the first's prompt (the video's tokens cached), with the answer it gets alone."""
    loaded = load(DATA / "nv-hub", dtype="float32")
    questions = ["What happens?", "Why?"]
    alone = [ChatSession(*loaded, video=clips[0]).send(q, max_tokens=6) for q in questions]
    video_tokens = loaded[0].config.video_tokens(8)
    url = video_url(clips[0])
    with serving(loaded, max_prefill=4) as server, WorkerGate(server.worker) as gate:
        gate.hold("step")
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(post, server, [{"role": "user", "content": "Hello"}])
            gate.wait_held()  # the worker stands still while both questions arrive
            asked = [pool.submit(post, server, [video_turn(q, url)]) for q in questions]
            gate.wait(lambda: gate.submitted == 3)
            gate.release()
            answers = [a.result().json() for a in asked]
            first.result()
    assert [a["choices"][0]["message"]["content"] for a in answers] == alone
    cached = sorted(a["usage"]["prompt_tokens_details"]["cached_tokens"] for a in answers)
    assert cached[0] < video_tokens < cached[1]
    assert [joined for _, joined in gate.steps if joined] == [1, 1, 1]  # one at a time

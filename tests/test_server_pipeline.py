"""The server on pipeline-parallel ranks: `mlx.launch -n 2 --backend ring -- python -m
mlx_llava.server --pipeline` (rank 0 answers HTTP, rank 1 holds the first decoder layer and the
vision tower) against one process's server on the same checkpoint, the committed tiny llava-hf
one in float32 (and for videos, the tiny LLaVA-NeXT-Video one).

One launch serves every picture request of this file, each sent to both servers in the same
order (so that their prompt caches hold the same conversations), and is stopped at the end by
Ctrl-C; the videos have a launch of their own. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import mlx.core as mx
import pytest

from llava_testing.launching import FAILED_RANK, LAUNCH_TIMEOUT, ROOT, Launch
from llava_testing.serving import data_url, free_port, serving, user, wait_until
from llava_testing.videos import video_turn, video_url, write_clip
from mlx_llava import distributed, load
from mlx_llava.cli import server as server_cli
from mlx_llava.prompt import encode_on_host
from mlx_llava.sampling import SamplingParams
from mlx_llava.server import GenerationRequest, Worker, lifecycle
from mlx_llava.server.worker import Admission, Turn

openai = pytest.importorskip("openai")

DATA = Path(__file__).parent / "fixtures" / "data"
MODEL = DATA / "hf-hub"  # 2 decoder layers: one per rank
VIDEO_MODEL = DATA / "nv-hub"  # LLaVA-NeXT-Video, 2 decoder layers
A, B = DATA / "images" / "a.png", DATA / "images" / "b.png"
SETTINGS = {"prompt_cache_size": 64}  # (as flags: --prompt-cache-size 64)


@pytest.fixture(scope="module")
def one_process():
    with serving(load(MODEL, dtype="float32"), model_id=str(MODEL), **SETTINGS) as server:
        yield server


class Pipeline:
    """The launched server: its URL and the launch."""

    def __init__(self, launch: Launch, url: str):
        self.launch = launch
        self.url = url


@contextlib.contextmanager
def launched(model: Path, log: Path):
    """The server of `model` on 2 ranks (a `Pipeline`), killed at the end."""
    port = free_port()
    argv = ["-m", "mlx_llava.server", "--model", str(model), "--dtype", "float32", "--pipeline"]
    argv += ["--port", str(port), "--prompt-cache-size", str(SETTINGS["prompt_cache_size"])]
    launch = Launch(*argv, log=log)
    url = f"http://127.0.0.1:{port}"

    def healthy():
        assert launch.process.poll() is None, launch.output
        try:
            return httpx.get(url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(healthy, timeout=LAUNCH_TIMEOUT, interval=0.2)
        yield Pipeline(launch, url)
    finally:
        launch.kill()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    with launched(MODEL, tmp_path_factory.mktemp("pipeline") / "launch.log") as launch:
        yield launch


def client(server) -> "openai.OpenAI":
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def post(server, body: dict) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)


def both(pipeline, one_process, request, *args):
    """`request(server, *args)` on the pipeline, then on one process: (pipeline's, one
    process's)."""
    return request(pipeline, *args), request(one_process, *args)


# Without ranks -----------------------------------------------------------------------------


def test_under_a_launch_the_server_needs_pipeline(monkeypatch, capsys):
    monkeypatch.delenv("MLX_LLAVA_DEBUG", raising=False)
    monkeypatch.setattr(distributed, "size", lambda group=None: 2)  # as under mlx.launch -n 2
    monkeypatch.setattr(server_cli, "load_from_args", lambda args: pytest.fail("it went on"))
    with pytest.raises(SystemExit) as exit_:
        server_cli.main(["--model", "demo"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and len(lines) == 1, lines
    assert lines[0].startswith("error: under mlx.launch the server needs --pipeline")


def test_a_failed_rank_stops_the_pipeline(tiny_model, monkeypatch):
    """A collective that fails (a rank died) ends the worker: its requests get a 503, new ones
    are refused, and the command line is told (it stops the server)."""
    worker = Worker(*tiny_model)
    worker.group = "a pipeline"  # as if split across ranks
    request = GenerationRequest(
        encode_on_host(*tiny_model, "USER: Hi ASSISTANT:", []), SamplingParams()
    )

    def lost(*args, **kwargs):
        raise RuntimeError("[ring] connection to a peer was lost")

    monkeypatch.setattr(distributed, "broadcast", lost)
    told = threading.Event()
    worker.on_failure = told.set
    events = []
    worker.submit(request, events.append)
    worker.start()
    assert worker.wait(30) and told.is_set()
    assert worker.failure == "the pipeline of ranks failed: [ring] connection to a peer was lost"
    assert [(e.kind, e.status) for e in events] == [("error", 503)]
    with pytest.raises(RuntimeError, match="shutting down"):
        worker.submit(request, events.append)


def test_a_turn_reaches_the_other_ranks_as_rank_0_holds_it():
    """What rank 0 broadcasts (JSON) gives the other ranks its turn: the same request numbers,
    token ids, digests (of pictures and videos), sampling and LLaVA-NeXT picture sizes; not
    the pixels of pictures and videos, which follow only when the vision tower needs them."""
    sampling = SamplingParams(max_tokens=7, temperature=0.5, seed=5, stop=["x", "yz"])
    pixels = mx.zeros((6, 4, 4, 3))
    admission = Admission(3, [1, 2, 9, 9, 3], ["d1", "d2"], sampling, pixels, [6, 4, 4, 3])
    admission.image_sizes = [(20, 15), (90, 90)]
    admission.video_pixels, admission.video_shape = mx.zeros((1, 2, 4, 4, 3)), [1, 2, 4, 4, 3]
    admission.video_digests = ["v1"]
    turn = Turn(cancels=[1, 2], admissions=[admission])
    shared = Turn.from_json(json.loads(json.dumps(turn.to_json())))
    unshared = dataclasses.replace(admission, pixel_values=None, video_pixels=None)
    assert shared == Turn([1, 2], [unshared], False)
    assert shared.admissions[0].image_sizes == [(20, 15), (90, 90)]  # tuples, as on rank 0


class _Following:
    """A stand-in worker for `follow`, whose waits are its turns: `signum` (Ctrl-C) reaches its
    process during the first, rank 0 closes it at the end of turn `closed_at`."""

    def __init__(self, closed_at: int, signum: int = signal.SIGINT):
        self.closed_at = closed_at
        self.signum = signum
        self.turns = 0
        self.closed = threading.Event()
        self.failure = None

    def start(self):
        pass

    def wait(self, timeout):
        self.turns += 1
        if self.turns == 1:
            os.kill(os.getpid(), self.signum)
        if self.turns == self.closed_at:
            self.closed.set()
        return self.closed.wait(timeout)


class _Left(Exception):
    """What SIGINT and SIGTERM raise in the test below, unless `follow` handles them."""


@pytest.fixture
def signals_raise():
    """SIGINT and SIGTERM raise `_Left` (instead of interrupting or ending pytest)."""

    def leave(*_):
        raise _Left

    saved = {sig: signal.signal(sig, leave) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield leave
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_a_signalled_follower_waits_for_rank_0(signals_raise, monkeypatch, capsys):
    """Ctrl-C reaches every rank: the followers go on until rank 0 closes the pipeline (they
    would otherwise leave it mid-step), or leave by themselves after the grace period."""
    worker = _Following(closed_at=3)
    lifecycle.follow(worker)  # (_Left if the signal ended it)
    assert worker.closed.is_set() and worker.turns == 3  # it went on until rank 0 closed it
    assert signal.getsignal(signal.SIGINT) is signals_raise  # the handlers are restored

    monkeypatch.setattr(lifecycle, "FOLLOWER_GRACE_S", 0.5)

    def exit_now(code):
        raise SystemExit(code)

    monkeypatch.setattr(lifecycle.os, "_exit", exit_now)
    late = _Following(closed_at=25, signum=signal.SIGTERM)  # (5 s: bounds the test)
    with pytest.raises(SystemExit) as exit_:
        lifecycle.follow(late)  # rank 0 does not close it in time
    assert exit_.value.code == 1
    assert "rank 0 did not stop the pipeline within 0.5 s of the signal" in capsys.readouterr().err


# Two ranks ---------------------------------------------------------------------------------


def test_health_names_the_ranks_and_their_layers(pipeline, one_process):
    health = httpx.get(pipeline.url + "/health", timeout=10).json()
    assert health["status"] == "ok"
    assert health["ranks"] == [
        {"rank": 0, "layers": [1, 1], "vision_tower": False},
        {"rank": 1, "layers": [0, 0], "vision_tower": True},
    ]
    alone = httpx.get(one_process.url + "/health", timeout=10).json()
    assert alone["ranks"] == [{"rank": 0, "layers": [0, 1], "vision_tower": True}]
    models = client(pipeline).models.list()
    assert [m.id for m in models.data] == [str(MODEL)]


def test_picture_questions_get_one_processs_answers(pipeline, one_process):
    def ask(server, pictures, question):
        answer = client(server).chat.completions.create(
            model=str(MODEL), messages=[user(question, *pictures)], max_tokens=24
        )
        return answer.choices[0].message.content, answer.usage.model_dump()

    for pictures, question in [([A], "What is shown here?"), ([A, B], "Compare them.")]:
        pictures = [data_url(p) for p in pictures]
        (text, usage), expected = both(pipeline, one_process, ask, pictures, question)
        assert (text, usage) == expected
        assert len(text) > 10 and usage["completion_tokens"] == 24


def test_two_turn_chat_reuses_the_cache_on_every_rank(pipeline, one_process):
    """Turn 2 resends the conversation: both answers are one process's, and so are the counts
    of cached prompt tokens, which cover turn 1's prompt (the picture's tokens included). A
    rank without the cache would lower them: the ranks start from the shortest of their
    cached prefixes. Asked again, turn 2 is cached whole but its last position.

    (This random model's answers hold bytes that are no text, so that the answer a client
    sends back tokenizes differently from the tokens generated: turn 2 reuses turn 1's prompt,
    not its answer.)
    """
    picture = data_url(A)

    def chat(server):
        ask = client(server).chat.completions.create
        first = ask(model=str(MODEL), messages=[user("What is it?", picture)], max_tokens=12)
        history = [
            user("What is it?", picture),
            {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": "Why?"},
        ]
        return [first] + [ask(model=str(MODEL), messages=history, max_tokens=12) for _ in "ab"]

    turns, expected = both(pipeline, one_process, chat)
    texts = [t.choices[0].message.content for t in turns]
    assert texts == [t.choices[0].message.content for t in expected]
    assert texts[1] == texts[2] and texts[0] != texts[1]
    usage = [t.usage for t in turns]
    cached = [u.prompt_tokens_details.cached_tokens for u in usage]
    assert cached == [t.usage.prompt_tokens_details.cached_tokens for t in expected]
    assert cached[1] >= usage[0].prompt_tokens
    assert cached[2] == usage[2].prompt_tokens - 1


def test_streamed_answer(pipeline, one_process):
    messages = [user("Describe the picture.", data_url(B))]
    stream = client(pipeline).chat.completions.create(
        model=str(MODEL),
        messages=messages,
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    expected = client(one_process).chat.completions.create(
        model=str(MODEL), messages=messages, max_tokens=20
    )
    assert text == expected.choices[0].message.content
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 20


BAD = [
    ({"messages": [user("word " * 400)]}, 400, "context"),  # the context is 256
    ({"messages": [user("<image> and <image>", data_url(A))]}, 400, "placeholder"),
    ({"messages": [user("Hi", "data:image/png;base64,aGVsbG8=")]}, 400, "not an image"),
    ({"messages": [user("Hi")], "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": [user("Hi")], "model": "gpt-4"}, 404, "does not exist"),
]


def test_bad_requests_get_a_4xx_and_the_ranks_go_on(pipeline, one_process):
    for body, status, words in BAD:
        response = post(pipeline, body)
        assert response.status_code == status, response.text
        assert words in response.json()["error"]["message"]
    good = {"messages": [user("Hello there!")], "max_tokens": 16}
    answer, expected = both(pipeline, one_process, lambda s: post(s, good).json()["choices"])
    assert answer == expected


def test_dropped_stream_stops_on_every_rank(pipeline, one_process):
    """A client that goes away mid-answer: its request leaves the batch, on rank 1 too (else
    the ranks would part ways and the next answer would be wrong or never come)."""
    body = {"messages": [user("Talk.", data_url(B))], "stream": True, "max_tokens": 200}
    with httpx.stream("POST", pipeline.url + "/v1/chat/completions", json=body, timeout=120) as r:
        received = 0
        for line in r.iter_lines():
            received += line.startswith("data: ")
            if received == 4:
                break  # the client goes away mid-answer
    health = wait_until(
        lambda: (h := httpx.get(pipeline.url + "/health").json())["active"] == 0 and h,
        timeout=10,
    )
    assert health["queued"] == 0
    good = {"messages": [user("Still there?", data_url(A))], "max_tokens": 16}
    answer, expected = both(pipeline, one_process, lambda s: post(s, good).json()["choices"])
    assert answer == expected


def test_concurrent_requests_share_the_pipelines_batch(pipeline, one_process):
    """Requests that arrive together are answered together (each got its first token before
    any finished), with the answers each gets alone. The answers are long (160-200 tokens, the
    third ends at its EOS after 172) so that a client thread that starts late on a busy machine
    still joins the others' batch."""
    requests = [
        ([user("What is it?", data_url(B))], 160),
        ([user("Tell me a story.")], 180),
        ([user("Compare them.", data_url(B), data_url(A))], 200),
    ]
    start = threading.Barrier(len(requests))

    def body(request):
        messages, max_tokens = request
        return {"messages": messages, "max_tokens": max_tokens}

    def streamed(request):
        times, text = [], ""
        payload = {**body(request), "stream": True}
        url = pipeline.url + "/v1/chat/completions"
        start.wait(timeout=30)
        with httpx.stream("POST", url, json=payload, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    delta = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else ""
                    if delta:
                        times.append(time.monotonic())
                        text += delta
        return text, times[0], times[-1]

    alone = [
        post(one_process, body(r)).json()["choices"][0]["message"]["content"] for r in requests
    ]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(streamed, requests))
    assert [text for text, _, _ in together] == alone
    assert max(first for _, first, _ in together) < min(last for _, _, last in together)


def test_ctrl_c_lets_open_answers_finish_then_stops_every_rank(pipeline):
    """Ctrl-C (SIGINT to the launcher and every rank): rank 0 stops taking requests, lets the
    open answer finish, closes the pipeline, and every rank exits 0. (Last: it ends the
    launch.)"""
    pids = pipeline.launch.rank_pids()
    body = {"messages": [user("Go on.")], "stream": True, "max_tokens": 30}
    with httpx.stream("POST", pipeline.url + "/v1/chat/completions", json=body, timeout=120) as r:
        lines = (line for line in r.iter_lines() if line)
        assert next(lines).startswith("data: {")  # the answer has begun
        pipeline.launch.signal_all(signal.SIGINT)
        rest = list(lines)
    chunks = [json.loads(line[6:]) for line in rest[:-1]]
    assert rest[-1] == "data: [DONE]"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert pipeline.launch.wait_gone(pids, timeout=60) is not None, pipeline.launch.output
    pipeline.launch.process.wait(timeout=30)
    assert not FAILED_RANK.search(pipeline.launch.output), pipeline.launch.output
    with pytest.raises(httpx.ConnectError):
        httpx.get(pipeline.url + "/health", timeout=5)


WATCH = """
import sys, threading
from mlx_llava.server.lifecycle import stop_with_launcher
stopped = threading.Event()
stop_with_launcher(stopped.set)
print("watching", flush=True)
sys.exit(0 if stopped.wait(float(sys.argv[1])) else 3)
"""


@pytest.mark.parametrize("under_launch", [True, False])
def test_ranks_stop_when_the_launcher_goes_away(under_launch):
    """SIGTERM ends mlx.launch alone, and with it the write end of every rank's stdin: rank 0
    (here a stand-in) then stops the server, which closes the pipeline. Only under mlx.launch
    (MLX_RANK set) is the end of stdin taken for that."""
    env = {k: v for k, v in os.environ.items() if k != "MLX_RANK"}
    if under_launch:
        env["MLX_RANK"] = "0"
    process = subprocess.Popen(
        [sys.executable, "-c", WATCH, "30" if under_launch else "1"],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline() == "watching\n"
        process.stdin.write("typed into the launcher\n")
        process.stdin.close()  # the launcher is gone
        assert process.wait(timeout=30) == (0 if under_launch else 3)
    finally:
        process.kill()


# Videos on two ranks -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def video_servers(tmp_path_factory):
    """(the pipeline, one process) serving the tiny LLaVA-NeXT-Video checkpoint."""
    pytest.importorskip("av")
    log = tmp_path_factory.mktemp("video-pipeline") / "launch.log"
    loaded = load(VIDEO_MODEL, dtype="float32")
    with (
        launched(VIDEO_MODEL, log) as launch,
        serving(loaded, model_id=str(VIDEO_MODEL), **SETTINGS) as alone,
    ):
        yield launch, alone


def test_video_questions_get_one_processs_answers(video_servers, tmp_path):
    """A video goes to the rank with the vision tower as pictures do: a question about it, a
    follow-up (the video in the cached prefix: not sent to the ranks again), another video,
    and a video with a picture get one process's greedy answers, usage and cached counts."""
    pipeline, one_process = video_servers
    clips = [video_url(write_clip(tmp_path / f"{seed}.mp4", seed)) for seed in (0, 1)]
    video_tokens = one_process.worker.model.config.video_tokens(8)

    def chat(server):
        ask = client(server).chat.completions.create
        turn = [video_turn("What happens?", clips[0])]
        first = ask(model=str(VIDEO_MODEL), messages=turn, max_tokens=12)
        follow = turn + [
            {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": "Why?"},
        ]
        second = ask(model=str(VIDEO_MODEL), messages=follow, max_tokens=12)
        again = [video_turn("What happens?", clips[1])]
        other = ask(model=str(VIDEO_MODEL), messages=again, max_tokens=12)
        both_media = video_turn("And the picture?", clips[1])
        both_media["content"].insert(0, {"type": "image_url", "image_url": {"url": data_url(A)}})
        mixed = ask(model=str(VIDEO_MODEL), messages=[both_media], max_tokens=12)
        return [first, second, other, mixed]

    answers, expected = both(pipeline, one_process, chat)
    texts = [a.choices[0].message.content for a in answers]
    assert texts == [a.choices[0].message.content for a in expected]
    assert [a.usage.model_dump() for a in answers] == [a.usage.model_dump() for a in expected]
    assert len(set(texts)) == 4
    cached = [a.usage.prompt_tokens_details.cached_tokens for a in answers]
    assert cached[1] > video_tokens and cached[2] < video_tokens  # reused; not mistaken

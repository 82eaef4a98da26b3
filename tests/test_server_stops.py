"""The server stops cleanly: Ctrl-C reaches it through its event loop (not only through a
Python signal handler, which CPython may run late while the worker thread computes), and the
worker thread frees its MLX state before it ends (left to the thread's exit, a compiled
function freed while the interpreter finalizes aborts the process)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import mlx.core as mx

from llava_testing.serving import ROOT, free_port, user, wait_until
from mlx_llava import load
from mlx_llava.prompt import encode_on_host
from mlx_llava.sampling import SamplingParams
from mlx_llava.server import GenerationRequest, ServerConfig, make_worker
from mlx_llava.server.lifecycle import Server

DATA = Path(__file__).parent / "fixtures" / "data"
MODEL = DATA / "hf-hub"


def _no_requests(scope, receive, send):  # an ASGI app: the test is about the signals
    raise AssertionError("no request is made")


def test_signals_reach_the_server_through_its_event_loop():
    """While serving, SIGINT and SIGTERM are the event loop's (asyncio's wakeup fd), not a
    Python handler of uvicorn's; a signal stops the server, then is raised again into the
    handler that was there before (as uvicorn does)."""
    import uvicorn

    seen: list[int] = []
    before = signal.signal(signal.SIGINT, lambda sig, frame: seen.append(sig))
    server = Server(
        uvicorn.Config(_no_requests, host="127.0.0.1", port=free_port(), log_level="error")
    )
    during: list = []

    def interrupt() -> None:
        wait_until(lambda: server.started, timeout=30, interval=0.02)
        during.append(signal.getsignal(signal.SIGINT))
        signal.raise_signal(signal.SIGINT)

    thread = threading.Thread(target=interrupt)
    thread.start()
    try:
        server.run()  # in the main thread, as the command runs it
    finally:
        thread.join(timeout=30)
        signal.signal(signal.SIGINT, before)
    assert during and during[0] != server.handle_exit  # not uvicorn's own handler
    assert getattr(during[0], "__func__", None) is not Server.handle_exit
    assert seen == [signal.SIGINT]  # raised again after the shutdown, into the old handler


def test_the_worker_thread_frees_its_mlx_state_before_it_ends(monkeypatch):
    freed: list[str] = []
    clear_streams = mx.clear_streams

    def record() -> None:
        freed.append(threading.current_thread().name)
        clear_streams()

    monkeypatch.setattr(mx, "clear_streams", record)
    model, processor = load(MODEL, dtype="float32")
    worker = make_worker(model, processor, ServerConfig(model_id="tiny"))
    worker.start()
    done = threading.Event()
    encoded = encode_on_host(model, processor, "USER: Hi. ASSISTANT:", [])
    request = GenerationRequest(encoded, SamplingParams(max_tokens=3))
    worker.submit(request, lambda event: done.set() if event.kind == "done" else None)
    assert done.wait(60)
    worker.close()
    assert worker.wait(30)
    assert freed == ["mlx-llava-worker"]


def compiler_spy(directory: Path) -> Path:
    """A `g++` first on PATH that notes each call in the returned file, then runs the real one
    (where there is none, MLX's probe finds none either)."""
    real = shutil.which("g++")
    calls = directory / "g++.calls"
    script = directory / "g++"
    run = f'exec "{real}" "$@"' if real else "exit 127"
    script.write_text(f'#!/bin/sh\necho "$*" >> "{calls}"\n{run}\n')
    script.chmod(0o755)
    return calls


def test_ctrl_c_while_answering_lets_the_answer_finish_then_exits(tmp_path):
    """One process: Ctrl-C during a streamed answer; the answer ends, then the command exits
    130 with "interrupted" and no traceback. MLX's probe for a C++ compiler (`system()`, which
    ignores SIGINT while it runs) is over before the server answers: during the first answer it
    made a Ctrl-C a coin toss."""
    compiler_calls = compiler_spy(tmp_path)
    port = free_port()
    command = [sys.executable, "-m", "mlx_llava.server", "--model", str(MODEL)]
    command += ["--dtype", "float32", "--port", str(port)]
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
        env["PYTHONFAULTHANDLER"] = "1"  # SIGABRT prints every thread's stack
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:

        def healthy() -> bool:
            assert process.poll() is None, log_path.read_text()
            try:
                return httpx.get(url + "/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, timeout=60, interval=0.2)
        assert compiler_calls.exists() and "--version" in compiler_calls.read_text()
        body = {"messages": [user("Go on.")], "stream": True, "max_tokens": 40}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = (line for line in r.iter_lines() if line)
            assert next(lines).startswith("data: {")
            process.send_signal(signal.SIGINT)
            rest = list(lines)
        assert rest[-1] == "data: [DONE]"
        chunks = [json.loads(line[6:]) for line in rest[:-1]]
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
        try:
            status = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGABRT)
            process.wait(timeout=30)
            log = log_path.read_text()
            raise AssertionError("no exit 30 s after the answer:\n" + log) from None
        assert status == 130, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
    output = log_path.read_text()
    assert "interrupted" in output and "Traceback" not in output, output
    assert "terminate called" not in output, output

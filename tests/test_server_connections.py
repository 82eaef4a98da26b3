"""The server's bounds on connections, against a live uvicorn on 127.0.0.1 through raw sockets:
a request's headers and body must arrive in time (slow or stalled clients are closed, a stalled
body is answered 408), idle kept-alive connections are closed, connections over the cap are
answered 503, and none of this cuts a streamed answer that outlasts every deadline.

The test server's deadlines are short (0.5 s). Every loop is bounded in count and time; waits
are on socket reads with timeouts, never sleeps.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import threading
from pathlib import Path

import pytest

from llava_testing.serving import serving, wait_until
from mlx_llava import load

DATA = Path(__file__).parent / "fixtures" / "data"
SHORT = 0.5  # the test server's deadlines, seconds
WAIT = 10.0  # the longest a test waits for the server to act (a bound, not a timing)


@pytest.fixture(scope="module")
def tiny():
    return load(DATA / "hf-hub", dtype="float32")


@pytest.fixture(scope="module")
def server(tiny):
    settings = dict(header_timeout=SHORT, body_timeout=SHORT, keep_alive_timeout=SHORT)
    with serving(tiny, model_id="tiny", **settings) as live:
        yield live


def connect(server) -> socket.socket:
    port = int(server.url.rsplit(":", 1)[1])
    return socket.create_connection(("127.0.0.1", port), timeout=WAIT)


def request(method: str, path: str, body: bytes = b"", length: int | None = None) -> bytes:
    """An HTTP/1.1 request's bytes (kept alive); `length` overrides the Content-Length."""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if method == "POST":
        size = len(body) if length is None else length
        head += f"Content-Type: application/json\r\nContent-Length: {size}\r\n"
    return (head + "\r\n").encode() + body


def response(sock: socket.socket) -> tuple[int, dict, bytes]:
    """The next whole response on `sock`: status, headers (lower-case names), body."""
    r = http.client.HTTPResponse(sock)
    r.begin()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()


def closed_by_server(sock: socket.socket, timeout: float = WAIT) -> bytes:
    """What the server sends until it closes the connection; fails if it keeps it open."""
    sock.settimeout(timeout)
    data = b""
    for _ in range(1000):
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        except socket.timeout:
            break
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"the server kept the connection open for {timeout} s")


def trickle(sock: socket.socket, data: bytes, every: float = 0.05) -> tuple[bool, int]:
    """Send `data` a byte at a time, one every `every` seconds (waiting on the socket meanwhile)
    until the server closes the connection: (whether it closed it, the bytes sent). Fails if the
    server sends anything."""
    sent = 0
    for byte in data:  # len(data) * every seconds at most
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            return True, sent
        sent += 1
        if select.select([sock], [], [], every)[0]:  # readable: closed, or an answer
            try:
                answer = sock.recv(65536)
            except ConnectionResetError:
                return True, sent
            assert answer == b"", f"unexpected answer: {answer[:80]!r}"
            return True, sent
    return False, sent


def test_headers_that_stop_half_way_close_the_connection(server):
    with connect(server) as silent, connect(server) as half:
        half.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no blank line
        assert closed_by_server(half) == b""  # closed, unanswered
        assert closed_by_server(silent) == b""  # a connection that never sends a byte too
    with connect(server) as s:  # the server goes on
        s.sendall(request("GET", "/health"))
        assert response(s)[0] == 200


def test_headers_trickled_a_byte_at_a_time_are_cut_off(server):
    # Each byte comes well within the deadline (every 0.05 s), the headers never do: the
    # deadline is for the whole of them, not between bytes.
    data = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 400 + b"\r\n\r\n"
    with connect(server) as s:
        closed, sent = trickle(s, data)  # 20 s at most
    assert closed and sent < len(data)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/chat"])
def test_body_that_stops_half_way_gets_408_and_closes(server, path):
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}]})
    body = body.encode()
    with connect(server) as s:
        s.sendall(request("POST", path, body[: len(body) // 2], length=len(body)))
        status, headers, answer = response(s)
        assert status == 408
        assert headers["connection"] == "close"
        error = json.loads(answer)["error"]
        if path.startswith("/api/"):
            assert "did not arrive" in error  # Ollama's {"error": "..."}
        else:
            assert error["code"] == "body_timeout" and error["type"] == "invalid_request_error"
            assert set(error) == {"message", "type", "param", "code"}
        assert closed_by_server(s) == b""


def test_body_nobody_reads_is_bounded_too(server):
    # The answer (404) goes out at once; the rest of the body is read and dropped, for no
    # longer than the body's deadline even when it trickles in (each byte would put off
    # uvicorn's keep-alive timeout).
    with connect(server) as s:
        s.sendall(request("POST", "/nowhere", b"{", length=400))
        assert response(s)[0] == 404
        closed, sent = trickle(s, b"a" * 399)  # 20 s at most
    assert closed and sent < 399


def test_idle_keep_alive_connection_is_closed(server):
    with connect(server) as s:
        for _ in range(2):  # the connection is kept for a second request...
            s.sendall(request("GET", "/health"))
            status, headers, _ = response(s)
            assert status == 200 and headers.get("connection") != "close"
        assert closed_by_server(s) == b""  # ...then closed once idle


def test_connections_over_the_cap_get_503(tiny):
    # Long deadlines here: the connections held open must outlast the test.
    with serving(tiny, max_connections=3, header_timeout=WAIT, keep_alive_timeout=WAIT) as live:
        held = [connect(live) for _ in range(3)]
        try:
            for s in held:  # each one answered, so each is open on the server's side
                s.sendall(request("GET", "/health"))
                assert response(s)[0] == 200
            for path in ("/v1/models", "/api/tags"):
                with connect(live) as extra:
                    extra.sendall(request("GET", path))
                    status, headers, answer = response(extra)
                    assert status == 503 and headers["connection"] == "close"
                    assert headers["retry-after"]
                    error = json.loads(answer)["error"]
                    if path.startswith("/api/"):
                        assert "too many open connections" in error
                    else:
                        assert error["code"] == "too_many_connections"
                    assert closed_by_server(extra) == b""
            held[0].sendall(request("GET", "/health"))  # those within the cap go on
            assert response(held[0])[0] == 200
        finally:
            for s in held:
                s.close()

        def answered() -> bool:
            with connect(live) as s:
                s.sendall(request("GET", "/health"))
                return response(s)[0] == 200

        assert wait_until(answered, timeout=WAIT)  # once they are closed, new ones are served


def test_streamed_answer_outlasting_every_deadline_is_not_cut(server, monkeypatch):
    # The answer's first steps go out, then the worker waits at a gate while other connections
    # prove that the deadlines have passed (since this request came in); then it goes on.
    engine, gate, steps = server.worker.engine, threading.Event(), []
    step = engine.step

    def gated():
        steps.append(1)
        if len(steps) > 2:
            gate.wait(WAIT)
        return step()

    monkeypatch.setattr(engine, "step", gated)
    body = {
        "messages": [{"role": "user", "content": "Talk."}],
        "stream": True,
        "max_tokens": 12,
        "stop": None,
        "stream_options": {"include_usage": True},
    }
    data = json.dumps(body).encode()
    try:
        with connect(server) as s:
            s.sendall(request("POST", "/v1/chat/completions", data))
            r = http.client.HTTPResponse(s)
            r.begin()
            assert r.status == 200
            assert r.readline().startswith(b"data: ")
            # Opened after the request, closed by the header deadline; and a stalled body
            # answered 408: both deadlines are over for the stream too.
            with connect(server) as idle, connect(server) as stalled:
                stalled.sendall(request("POST", "/v1/chat/completions", data[:5], len(data)))
                assert closed_by_server(idle) == b""
                assert response(stalled)[0] == 408
            gate.set()
            lines = [r.readline() for _ in range(100)]
        events = [line[6:].strip() for line in lines if line.startswith(b"data: ")]
        assert events[-1] == b"[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-2]["choices"][0]["finish_reason"] in ("length", "stop")
        assert chunks[-1]["usage"]["completion_tokens"] > 2  # tokens after the gate too
    finally:
        gate.set()

"""Reading pictures safely: http(s) downloads have a total deadline and a byte cap, and pictures
have a pixel cap (decompression bombs); each failure is one clear error.

The servers listen on 127.0.0.1 and every response loop stops by itself within seconds.
"""

from __future__ import annotations

import http.server
import io
import threading
import time

import pytest
from PIL import Image

from mlx_llava.image_io import FetchLimits, ImageLoadError, load_image

SERVER_LIMIT_S = 8.0  # no response loop runs longer than this


def png_bytes(size=(12, 9), colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def _headers(self, length=None, ctype="image/png"):
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()

    def do_GET(self):  # noqa: N802 - http.server's name
        stop = time.monotonic() + SERVER_LIMIT_S
        try:
            if self.path == "/ok":
                data = png_bytes()
                self._headers(len(data))
                self.wfile.write(data)
            elif self.path == "/trickle":  # a byte every 50 ms: never done within a deadline
                self._headers(10_000_000)
                while time.monotonic() < stop:
                    self.wfile.write(b"\x00")
                    self.wfile.flush()
                    time.sleep(0.05)
            elif self.path == "/endless":  # bytes as fast as they go, no length
                self._headers()
                block = b"\x00" * 65536
                while time.monotonic() < stop:
                    self.wfile.write(block)
            elif self.path == "/declared-big":
                self._headers(10**9)
            elif self.path == "/stall":  # headers, then nothing
                self._headers(1000)
                self.wfile.flush()
                time.sleep(min(3.0, SERVER_LIMIT_S))
            elif self.path == "/trickle-headers":  # a header byte every 50 ms, never done
                self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                while time.monotonic() < stop:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.05)
            elif self.path == "/not-a-picture":
                body = b"<html>hello</html>"
                self._headers(len(body), "text/html")
                self.wfile.write(body)
            else:
                self.send_error(404)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up, as it should


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_a_picture_downloads(server):
    img = load_image(f"{server}/ok")
    assert img.size == (12, 9) and img.getpixel((0, 0)) == (200, 30, 30)


@pytest.mark.parametrize("path", ["/trickle", "/stall", "/trickle-headers"])
def test_a_slow_download_stops_at_the_deadline(server, path):
    tic = time.monotonic()
    with pytest.raises(ImageLoadError, match=r"cannot fetch image URL .*took longer than 1 s"):
        load_image(f"{server}{path}", timeout=1.0)
    assert time.monotonic() - tic < 3.0  # the deadline is the feature: the whole, not each read


def test_an_endless_download_stops_at_the_byte_cap(server):
    with pytest.raises(ImageLoadError, match="more than the limit of 1 MB"):
        load_image(f"{server}/endless", max_bytes=1_000_000, timeout=20)


def test_a_declared_size_over_the_cap_is_refused_before_reading(server):
    # The body never comes: waiting for it would end at the deadline, with another message.
    with pytest.raises(ImageLoadError, match="1000 MB, more than the limit of 50 MB"):
        load_image(f"{server}/declared-big", timeout=5.0)  # (the default cap)


def test_limits_come_from_the_environment(server, monkeypatch):
    monkeypatch.setenv("MLX_LLAVA_MAX_IMAGE_MB", "0.5")
    monkeypatch.setenv("MLX_LLAVA_FETCH_TIMEOUT", "7")
    assert FetchLimits.from_env() == FetchLimits(timeout=7.0, max_bytes=500_000)
    with pytest.raises(ImageLoadError, match="more than the limit of 500000 bytes"):
        load_image(f"{server}/endless")
    monkeypatch.setenv("MLX_LLAVA_FETCH_TIMEOUT", "soon")
    with pytest.raises(ImageLoadError, match="MLX_LLAVA_FETCH_TIMEOUT must be a number"):
        load_image(f"{server}/ok")


@pytest.mark.parametrize(
    "path, message",
    [("/missing", "HTTP Error 404"), ("/not-a-picture", "cannot read image .* not an image")],
)
def test_bad_answers_are_one_clear_error(server, path, message):
    with pytest.raises(ImageLoadError, match=message):
        load_image(f"{server}{path}")


def test_a_refused_connection_is_one_clear_error():
    with pytest.raises(ImageLoadError, match="cannot fetch image URL 'http://127.0.0.1:9/x.png'"):
        load_image("http://127.0.0.1:9/x.png", timeout=5)


def test_pictures_over_the_pixel_cap_are_refused_before_decoding(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("L", (4000, 3000)).save(path)  # a few KB that decode to 12 M pixels
    with pytest.raises(ImageLoadError, match="4000 x 3000 pixels is more than the limit of"):
        load_image(path, max_pixels=10_000_000)
    assert load_image(path).size == (4000, 3000)  # the default cap (Pillow's) allows it


def test_pillows_own_bomb_guard_is_one_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("L", (400, 300)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses > 2x this at open
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_image(path, max_pixels=10**9)


def test_a_name_that_takes_long_to_resolve_stops_at_the_deadline(monkeypatch):
    """The lookup is inside the download's deadline: a resolver that never answers (a dead DNS
    server) costs the deadline, not the resolver's own minutes."""
    release = threading.Event()

    def stuck(*args, **kwargs):
        release.wait(30)
        raise OSError("released")

    monkeypatch.setattr("socket.getaddrinfo", stuck)
    tic = time.monotonic()
    try:
        with pytest.raises(ImageLoadError, match=r"cannot fetch image URL .*took longer than"):
            load_image("http://pictures.invalid/a.png", timeout=0.5)
        assert time.monotonic() - tic < 3.0
    finally:
        release.set()

"""Test helpers for the server: a real uvicorn server in a thread on 127.0.0.1 (a free port),
always stopped, and pictures as data URLs."""

from __future__ import annotations

import base64
import contextlib
import io
import socket
import threading
import time
from pathlib import Path

import uvicorn

from mlx_llava.server import ServerConfig, create_app
from mlx_llava.server.connections import uvicorn_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


class LiveServer:
    """`create_app(...)` served by uvicorn on 127.0.0.1 in a background thread, configured as
    the command line does (`uvicorn_config`: the app's deadlines and connection cap)."""

    def __init__(self, app):
        self.app = app
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        config = uvicorn_config(
            app,
            app.state.service.config,
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=5,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True
        )

    @property
    def worker(self):
        return self.app.state.service.worker

    def start(self, timeout: float = 30.0) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()


@contextlib.contextmanager
def serving(model_and_processor, **settings):
    """A live server for `(model, processor)` with `ServerConfig(**settings)`."""
    model, processor = model_and_processor
    settings.setdefault("model_id", "test-model")
    server = LiveServer(create_app(model, processor, ServerConfig(**settings))).start()
    try:
        yield server
    finally:
        server.stop()


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_url(path_or_image, fmt: str = "PNG") -> str:
    """A picture as a data URL (a path's bytes as they are, a PIL image encoded as `fmt`)."""
    if isinstance(path_or_image, (str, Path)):
        data = Path(path_or_image).read_bytes()
    else:
        buffer = io.BytesIO()
        path_or_image.save(buffer, format=fmt)
        data = buffer.getvalue()
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(data).decode()


def user(text: str, *pictures) -> dict:
    """An OpenAI user message with `pictures` (data URLs or other URLs) before the text."""
    parts = [{"type": "image_url", "image_url": {"url": p}} for p in pictures]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def wait_until(condition, timeout: float = 10.0, interval: float = 0.02):
    """Poll `condition()` until it is truthy (its value) or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def slow_steps(worker, seconds: float, monkeypatch) -> list:
    """Make each decoding step of `worker` take at least `seconds` (to catch a request in the
    act); returns a list that records (rows in the batch, rows joining) at every step."""
    engine = worker.engine
    step = engine.step
    sizes: list[tuple[int, int]] = []

    def slow():
        sizes.append((len(engine.rows), len(engine.waiting)))
        time.sleep(seconds)
        return step()

    monkeypatch.setattr(engine, "step", slow)
    return sizes


CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1000,720",
]


def chromium_driver(user_data_dir: Path):
    """A headless Chromium driven by selenium through Debian's chromedriver, or a reason why
    there is none (scripts/install_browser.sh installs them)."""
    import shutil

    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        return None, "selenium is not installed (scripts/install_browser.sh)"
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if not chromium or not chromedriver:
        return None, "no chromium + chromedriver on PATH (scripts/install_browser.sh)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={user_data_dir}"]:
        options.add_argument(flag)
    try:
        return webdriver.Chrome(service=Service(chromedriver), options=options), None
    except Exception as e:  # noqa: BLE001 - a browser that cannot start is a skip reason
        return None, f"chromium did not start: {str(e).splitlines()[0]}"

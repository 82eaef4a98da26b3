"""Test helpers for the server: a real uvicorn server in a thread on 127.0.0.1 (a free port),
always stopped; the worker's moments to wait on (`WorkerGate`), never the clock; pictures as
data URLs; a headless Chromium for the page."""

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

ROOT = Path(__file__).resolve().parents[1]  # the checkout (the test extra installs it editable)
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


class WorkerGate:
    """The worker's moments as a test sees them (`Worker.observe`), and a gate that holds the
    worker thread at one of them until the test lets it go on.

    `moments` lists (moment, details) in the order they happened: "admitted" (`number`),
    "step" (`rows` after it, `joined` at it), "finished" (`number`, `reason`); `numbers`
    lists the numbers of the requests handed to `worker.submit` (`submitted` counts them) and
    `cancelled` those the server asked `worker.cancel` to stop (it does once each answer ends,
    maybe after the gate was made, and when its client goes away).

    `hold(moment)` stops the worker at its next `moment`, `wait_held()` waits until it stands
    there, `release()` lets it go on and `step()` lets it do one more step and stop again. Each
    wait is bounded; a worker held longer than `max_hold` seconds goes on by itself (`overheld`
    says so), so that a failing test cannot hang the server. Use it in a `with` block: leaving
    it releases the worker and the gate goes inert (a worker keeps its observers).
    """

    def __init__(self, worker, max_hold: float = 60.0):
        self.worker = worker
        self.max_hold = max_hold
        self.moments: list[tuple[str, dict]] = []
        self.numbers: list[int] = []
        self.cancelled: list[int] = []
        self.overheld = False
        self._changed = threading.Condition()
        self._hold_at: str | None = None
        self._held: tuple[str, dict] | None = None
        self._active = True
        self._submit, self._cancel = worker.submit, worker.cancel
        # Attributes of this worker only, until the gate is left (gates nest).
        self._outer = {name: vars(worker).get(name) for name in ("submit", "cancel")}
        worker.submit, worker.cancel = self._count_submit, self._note_cancel
        worker.observe(self._observe)

    def __enter__(self) -> "WorkerGate":
        return self

    def __exit__(self, *exc) -> None:
        with self._changed:
            self._active = False
            self._hold_at = self._held = None
            self._changed.notify_all()
        for name, outer in self._outer.items():
            if outer is None:
                delattr(self.worker, name)
            else:
                setattr(self.worker, name, outer)

    # What happened -----------------------------------------------------------------------

    @property
    def submitted(self) -> int:
        return len(self.numbers)

    @property
    def steps(self) -> list[tuple[int, int]]:
        """(rows in the batch after it, rows that joined at it) of each step, in order."""
        return [(d["rows"], d["joined"]) for m, d in self.moments if m == "step"]

    @property
    def admitted(self) -> list[int]:
        """The numbers of the requests that joined the batch, in order."""
        return [d["number"] for m, d in self.moments if m == "admitted"]

    @property
    def finished(self) -> dict[int, str]:
        """number -> finish reason ("stop", "length", "cancelled") of the requests that ended."""
        return {d["number"]: d["reason"] for m, d in self.moments if m == "finished"}

    def wait(self, condition, timeout: float = 30.0):
        """Wait until `condition()` is truthy (checked at each moment and submission); its
        value, or AssertionError after `timeout` seconds."""
        with self._changed:
            value = self._changed.wait_for(condition, timeout)
        if not value:
            raise AssertionError(f"the worker did not get there within {timeout} s")
        return value

    # Holding the worker ------------------------------------------------------------------

    def hold(self, moment: str = "step") -> None:
        """Stop the worker at its next `moment` ("admitted", "step" or "finished"). A "step"
        is one after an admission this gate saw: the last step of an earlier answer may come
        after its client had the whole answer (its events are sent before the moment)."""
        with self._changed:
            self._hold_at = moment

    def wait_held(self, timeout: float = 30.0) -> tuple[str, dict]:
        """Wait until the worker stands at the moment asked for; (moment, details)."""
        return self.wait(lambda: self._held, timeout)

    @property
    def held(self) -> bool:
        with self._changed:
            return self._held is not None

    def release(self) -> None:
        """Let the held worker go on (and hold it nowhere)."""
        with self._changed:
            self._hold_at = self._held = None
            self._changed.notify_all()

    def step(self, timeout: float = 30.0, until=None) -> tuple[str, dict] | None:
        """Let the held worker do one more step and stop it after that one: (moment, details),
        or None if `until()` came true first (say, the batch emptied and no step came)."""
        with self._changed:
            self._held, self._hold_at = None, "step"
            self._changed.notify_all()
        self.wait(lambda: self._held or (until is not None and until()), timeout)
        with self._changed:
            return self._held

    # The worker thread and the server's threads ------------------------------------------

    def _observe(self, moment: str, details: dict) -> None:
        with self._changed:
            if not self._active:
                return
            self.moments.append((moment, dict(details)))
            if moment == self._hold_at and (moment != "step" or self.admitted):
                self._hold_at, self._held = None, (moment, dict(details))
            self._changed.notify_all()
            if self._held is not None and not self._changed.wait_for(
                lambda: self._held is None, self.max_hold
            ):
                self.overheld, self._held = True, None

    def _count_submit(self, *args, **kwargs):
        job = self._submit(*args, **kwargs)
        with self._changed:
            self.numbers.append(job.number)
            self._changed.notify_all()
        return job

    def _note_cancel(self, job) -> None:
        self._cancel(job)
        with self._changed:
            self.cancelled.append(job.number)
            self._changed.notify_all()


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

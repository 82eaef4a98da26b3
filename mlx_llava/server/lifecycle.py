"""The server process's life: uvicorn told of Ctrl-C and SIGTERM through its event loop, and
under `mlx.launch --pipeline` the ranks other than 0 following rank 0 until it closes, the whole
pipeline stopping when the launcher goes away.

uvicorn catches SIGINT and SIGTERM with `signal.signal`: CPython then runs the handler on the
main thread at its next bytecode check, which another thread can cancel. On CPython 3.11, a
thread that takes the GIL after a drop request recomputes the "eval breaker" without the
pending signal (only the main thread may handle one), so a signal that arrives while the worker
thread generates can wait until the main thread next has to wait for the GIL: a Ctrl-C that the
server does not hear. `loop.add_signal_handler` does not depend on that: the signal wakes the
event loop through its wakeup fd, and the loop calls the handler.

One more way to lose a Ctrl-C: the first function MLX's CPU backend compiles asks whether a C++
compiler exists with C's `system("g++ --version")`, and `system()` ignores SIGINT and SIGQUIT in
the whole process while its child runs. `prime_cpu_compiler` has that happen at startup rather
than during the first answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
import sys
import threading
import time
from typing import Callable, Iterator

import mlx.core as mx
import uvicorn

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
FOLLOWER_GRACE_S = 15.0  # a signalled rank other than 0 waits this long for rank 0 to stop it


class Server(uvicorn.Server):
    """`uvicorn.Server` whose SIGINT and SIGTERM reach it through the event loop. As uvicorn
    does, the signals it stopped for are raised again once it has shut down, into the handlers
    that were there before it started."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        loop = asyncio.get_running_loop()
        before = {sig: signal.getsignal(sig) for sig in HANDLED_SIGNALS}
        received: list[int] = []

        def stop(sig: int) -> None:
            received.append(sig)
            self.handle_exit(sig, None)

        for sig in HANDLED_SIGNALS:
            loop.add_signal_handler(sig, stop, sig)
        try:
            yield
        finally:
            for sig, handler in before.items():
                loop.remove_signal_handler(sig)
                signal.signal(sig, handler)
        for sig in reversed(received):
            signal.raise_signal(sig)


def prime_cpu_compiler() -> None:
    """Run MLX's one-time probe for a C++ compiler now (a compiled function on the CPU),
    while a signal ignored for its few milliseconds costs nothing."""
    with mx.stream(mx.cpu):
        mx.eval(mx.compile(lambda x: x * x + 1)(mx.zeros((1,))))


def follow(worker) -> None:
    """A rank other than 0: run the worker's turns until rank 0 closes them.

    Ctrl-C reaches every rank of a launch: rank 0 then stops serving (letting open answers
    finish) and closes the pipeline. A signalled follower therefore goes on until rank 0 closes
    it, or leaves by itself FOLLOWER_GRACE_S later.
    """
    signalled: list[float] = []

    def note(*_) -> None:
        signalled.append(time.monotonic())

    worker.start()
    handlers = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not worker.wait(0.2):
            if signalled and time.monotonic() - signalled[0] > FOLLOWER_GRACE_S:
                from ..distributed import rank_prefix

                print(
                    f"{rank_prefix()}error: rank 0 did not stop the pipeline within "
                    f"{FOLLOWER_GRACE_S:g} s of the signal",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(1)  # the worker thread may be waiting inside a collective
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if worker.failure:
        raise RuntimeError(worker.failure)


def stop_with_launcher(stop: Callable[[], None]) -> None:
    """Call `stop` when mlx.launch goes away (e.g. SIGTERM on it, which ends it alone).

    mlx.launch hands each rank a pipe as its stdin and closes it only when it exits, so the
    end of stdin means the launcher is gone; nobody reads stdout and stderr any more either.
    """
    try:
        watched = "MLX_RANK" in os.environ and stat.S_ISFIFO(os.fstat(0).st_mode)
    except OSError:
        watched = False
    if not watched:
        return

    def watch() -> None:
        try:
            while os.read(0, 1 << 16):
                pass  # what is typed into the launcher is forwarded to every rank
        except OSError:
            return
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        stop()

    threading.Thread(target=watch, name="mlx-llava-launcher-watch", daemon=True).start()

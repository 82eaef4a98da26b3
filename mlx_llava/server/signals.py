"""uvicorn's server, told of Ctrl-C and SIGTERM through its event loop.

uvicorn catches SIGINT and SIGTERM with `signal.signal`: CPython then runs the handler on the
main thread at its next bytecode check, which another thread can cancel. On CPython 3.11, a
thread that takes the GIL after a drop request recomputes the "eval breaker" without the
pending signal (only the main thread may handle one), so a signal that arrives while the worker
thread generates can wait until the main thread next has to wait for the GIL: a Ctrl-C that the
server does not hear. `loop.add_signal_handler` does not depend on that: the signal wakes the
event loop through its wakeup fd, and the loop calls the handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from typing import Iterator

import uvicorn

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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

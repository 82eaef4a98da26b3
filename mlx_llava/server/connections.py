"""The connections: how long a client may take to send a request, and how many may be open.

uvicorn's HTTP/1.1 protocol (h11) waits for a request's headers for as long as the client keeps
the connection open, and a connection that never sends a byte is never closed; its
`limit_concurrency` only answers *requests* with a plain-text 503 once the open connections (idle
ones included) reach it, and it still accepts and keeps every connection. `BoundedH11Protocol`
adds what is missing, at the connection:

- the header deadline: a request's headers must arrive within `header_timeout` seconds of the
  connection opening, or of the first byte of a following request on a kept-alive connection
  (the wait before that byte is uvicorn's `timeout_keep_alive`), else the connection is closed;
- the same deadline, `body_timeout`, for the rest of a body that nobody reads (the answer was
  sent before the body ended: a 404, a 413); the body a route reads is bounded by `Guard`
  (app.py), which answers 408;
- the connection cap: beyond `max_connections` open connections, a new one is answered 503 (the
  app's JSON error, then closed) as soon as its request's headers arrive, without reaching the
  app.

Answers are never bounded: a stream lasts as long as it generates. `uvicorn_config` builds the
server's `uvicorn.Config` with these; the command line and the tests both use it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any, Optional

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .app import ServerConfig, error_response
from .schemas import RequestError

log = logging.getLogger("mlx_llava.server")
SPARE_FILES = 128  # file descriptors kept beyond the connections: model files, sockets, logs


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for receiving a request and a connection cap."""

    def __init__(self, *args: Any, settings: ServerConfig, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.max_connections = settings.max_connections
        self.timeouts = {"headers": settings.header_timeout, "body": settings.body_timeout}
        self.deadline: Optional[asyncio.TimerHandle] = None
        self.waiting_for: Optional[str] = None  # "headers", "body" or None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            log.warning(
                "%d connections open, over --max-connections: answering 503",
                len(self.connections),
            )
            self.app = functools.partial(refuse, limit=self.max_connections)
        self.watch()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.set_deadline(None)
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        self.watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.watch()

    def watch(self) -> None:
        """Start, keep or stop the deadline for what the connection now waits for."""
        ours, theirs = self.conn.our_state, self.conn.their_state
        if self.transport is None or self.transport.is_closing():
            waiting_for = None
        elif ours is h11.IDLE and theirs is h11.IDLE:
            # The first request, or the next one once its first bytes came: the idle time
            # between requests is uvicorn's keep-alive timeout.
            started = self.cycle is None or bool(self.conn.trailing_data[0])
            waiting_for = "headers" if started else None
        elif ours in (h11.DONE, h11.MUST_CLOSE) and theirs is h11.SEND_BODY:
            waiting_for = "body"  # answered already: the rest is read and dropped
        else:
            waiting_for = None  # the app reads the body (Guard bounds it) or answers
        if waiting_for != self.waiting_for:
            self.set_deadline(waiting_for)

    def set_deadline(self, waiting_for: Optional[str]) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        self.waiting_for = waiting_for
        if waiting_for is not None:
            self.deadline = self.loop.call_later(self.timeouts[waiting_for], self.expire)

    def expire(self) -> None:
        """The client took too long to send a request's headers (or an unread body): close."""
        self.deadline = None
        if self.transport.is_closing():
            return
        log.info(
            "closing a connection from %s: its request's %s took over %g s",
            f"{self.client[0]}:{self.client[1]}" if self.client else "?",
            self.waiting_for,
            self.timeouts[self.waiting_for],
        )
        try:
            self.conn.send(h11.ConnectionClosed())
        except h11.LocalProtocolError:
            pass
        self.transport.close()


async def refuse(scope, receive, send, limit: int) -> None:
    """The app of a connection over the cap: 503, the app's JSON error, and close."""
    error = RequestError(
        f"the server has too many open connections (over {limit}, --max-connections); retry "
        "later",
        code="too_many_connections",
        status=503,
    )
    response = error_response(scope["path"], error)
    response.headers["connection"] = "close"
    await response(scope, receive, send)


def uvicorn_config(
    app, settings: ServerConfig, host: str = "127.0.0.1", port: int = 8080, **options: Any
) -> uvicorn.Config:
    """The server's `uvicorn.Config`: HTTP/1.1 through `BoundedH11Protocol` with `settings`'
    deadlines and cap, idle keep-alive connections closed after `settings.keep_alive_timeout`
    seconds; `options` go to `uvicorn.Config` as they are (log_level, timeouts...)."""
    raise_file_limit(settings.max_connections + SPARE_FILES)
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=functools.partial(BoundedH11Protocol, settings=settings),  # type: ignore[arg-type]
        timeout_keep_alive=settings.keep_alive_timeout,  # type: ignore[arg-type]
        ws="none",
        **options,
    )


def raise_file_limit(needed: int) -> None:
    """Raise the soft limit of open files to `needed` where the hard limit allows (macOS's
    soft limit is 256); warn when it cannot."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        target = soft
    if target < needed:
        log.warning(
            "the open-file limit (%d) is below --max-connections + %d: new connections may fail "
            "before the cap answers 503 (raise `ulimit -n` or lower --max-connections)",
            target,
            SPARE_FILES,
        )

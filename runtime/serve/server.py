"""Running the app: uvicorn with a drain step and the connection limits of ``ServeLimits`` (``app.state.limits``),
in the foreground (``toolkit serve``) or in a background thread on a free loopback port (``toolkit bench serve``,
tests)."""
from __future__ import annotations

import functools
import socket
import threading

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol


class DrainingServer(uvicorn.Server):
    """uvicorn's server, plus: when it starts shutting down (SIGTERM, Ctrl-C), ``drain()`` is called first, so that
    requests waiting for batch company run now instead of holding the graceful shutdown for ``max_wait_ms``."""

    def __init__(self, config: uvicorn.Config, drain):
        super().__init__(config)
        self.drain = drain

    async def shutdown(self, sockets=None) -> None:
        self.drain()
        await super().shutdown(sockets)


class HeadTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for the request head: a connection that has not sent a whole request
    line and headers within ``header_timeout_s`` of opening (or of its previous response) is closed. uvicorn's own
    keep-alive timer starts only after a response and stops at the first byte, so without this a connection that
    sends nothing, or trickles its headers, stays open for ever."""

    def __init__(self, *args, header_timeout_s: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self._head_deadline = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._await_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._await_head()

    def handle_events(self) -> None:
        super().handle_events()
        if self._request_in_progress():
            self._cancel_head_deadline()

    def connection_lost(self, exc) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def _request_in_progress(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _await_head(self) -> None:
        self._cancel_head_deadline()
        if not self.transport.is_closing() and not self._request_in_progress():   # (a pipelined one may be)
            self._head_deadline = self.loop.call_later(self.header_timeout_s, self._head_too_slow)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        if not self.transport.is_closing() and not self._request_in_progress():
            self.transport.close()


def uvicorn_config(app, **where) -> uvicorn.Config:
    """uvicorn's config for ``app`` with its ``ServeLimits``' connection limits; ``where``: host/port, log level.
    WebSockets are off: the API has none, and an upgraded connection would outlive every limit here."""
    limits = app.state.limits
    protocol = functools.partial(HeadTimeoutH11Protocol, header_timeout_s=limits.header_timeout_s)
    return uvicorn.Config(app, http=protocol, ws="none", timeout_keep_alive=limits.keep_alive_s,
                          h11_max_incomplete_event_size=limits.max_header_bytes, limit_concurrency=limits.concurrency,
                          timeout_graceful_shutdown=limits.shutdown_grace_s, **where)


def serve_forever(app, *, host: str, port: int) -> None:
    DrainingServer(uvicorn_config(app, host=host, port=port, log_level="info"), app.state.drain).run()


class RunningServer:
    """``make_app(on_ready)``'s app served on a free 127.0.0.1 port in a background thread; ready (warmed up)
    when the constructor returns. ``close()`` shuts it down as SIGTERM would."""

    def __init__(self, make_app, startup_timeout_s: float = 120.0):
        ready = threading.Event()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(2048)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        app = make_app(ready.set)
        self.server = DrainingServer(uvicorn_config(app, log_level="warning", backlog=2048), app.state.drain)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        if not ready.wait(startup_timeout_s):
            self.close()
            raise RuntimeError(f"the server did not warm up within {startup_timeout_s:g} s")

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join()
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

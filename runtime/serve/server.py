"""Running the app: uvicorn with a drain step, in the foreground (``toolkit serve``) or in a background thread on a
free loopback port (``toolkit bench serve``, tests)."""
from __future__ import annotations

import socket
import threading

import uvicorn


class DrainingServer(uvicorn.Server):
    """uvicorn's server, plus: when it starts shutting down (SIGTERM, Ctrl-C), ``drain()`` is called first, so that
    requests waiting for batch company run now instead of holding the graceful shutdown for ``max_wait_ms``."""

    def __init__(self, config: uvicorn.Config, drain):
        super().__init__(config)
        self.drain = drain

    async def shutdown(self, sockets=None) -> None:
        self.drain()
        await super().shutdown(sockets)


def serve_forever(app, *, host: str, port: int, graceful_timeout_s: float) -> None:
    config = uvicorn.Config(app, host=host, port=port, log_level="info",
                            timeout_graceful_shutdown=int(graceful_timeout_s) + 1)
    DrainingServer(config, app.state.drain).run()


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
        self.server = DrainingServer(uvicorn.Config(app, log_level="warning", backlog=2048), app.state.drain)
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

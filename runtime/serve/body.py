"""Request-body limits of ``toolkit serve``, enforced while the body streams in: an ASGI middleware around
``receive``. A body over ``max_bytes`` gets 413 as soon as its Content-Length says so or, chunked, as soon as that
many bytes have arrived (never buffered whole first); a body not complete within ``timeout_s`` of its request's
head gets 408, so a client trickling bytes holds neither a connection nor a shutdown. Both answers are the API's
JSON error, counted by ``on_reject(status, kind)``; the connection is closed after them (the rest of the body is
never read)."""
from __future__ import annotations

import asyncio
from collections.abc import Callable

from starlette.responses import JSONResponse


class BodyRejected(Exception):
    def __init__(self, status: int, message: str, kind: str):
        super().__init__(message)
        self.status, self.kind = status, kind


class BodyLimits:
    def __init__(self, app, *, max_bytes: int, timeout_s: float, on_reject: Callable[[int, str], None]):
        self.app, self.max_bytes, self.timeout_s, self.on_reject = app, max_bytes, timeout_s, on_reject

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        answered = False

        async def send_noting_start(message) -> None:
            nonlocal answered
            answered = answered or message["type"] == "http.response.start"
            await send(message)
        try:
            self._check_declared_length(scope)
            await self.app(scope, self._limited(receive), send_noting_start)
        except BodyRejected as exc:
            self.on_reject(exc.status, exc.kind)
            if answered:   # a handler answered before reading the whole body: nothing more can be sent
                return
            response = JSONResponse({"error": str(exc)}, status_code=exc.status, headers={"Connection": "close"})
            await response(scope, receive, send)

    def _check_declared_length(self, scope) -> None:
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                raise self._too_large(f"declares {int(value)} bytes")

    def _limited(self, receive):
        """``receive`` counting body bytes against ``max_bytes`` and the body's time against ``timeout_s``; once the
        body is complete, the plain ``receive`` (a later call waits for the disconnect, for as long as it takes)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        received, complete = 0, False

        async def receive_within_limits():
            nonlocal received, complete
            if complete:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise BodyRejected(408, f"the request body did not arrive within {self.timeout_s:g} s "
                                        "(--body-timeout); send it at once", "timeout") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large(f"sent more than {self.max_bytes} bytes")
                complete = not message.get("more_body", False)
            return message
        return receive_within_limits

    def _too_large(self, what: str) -> BodyRejected:
        return BodyRejected(413, f"the request body {what}; this server reads at most {self.max_bytes}", "validation")

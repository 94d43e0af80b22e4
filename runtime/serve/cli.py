"""``toolkit serve MODEL``: load once, warm up, serve HTTP until SIGTERM/Ctrl-C (then finish what is waiting).
This module imports only typer; FastAPI and uvicorn are imported when the command runs (`pip install '.[serve]'`)."""
from __future__ import annotations

import ipaddress
import math
import os
from typing import Optional

import typer

from atdiff.runtime.devices import DEVICE_HELP
from atdiff.runtime.errors import ToolkitError


def serve(
    model: str = typer.Argument(..., help="Export directory (or diffusers dir with --backend torch)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; anything but loopback wants --api-key-env."),
    port: int = typer.Option(8000, help="TCP port."),
    backend: str = typer.Option("onnxruntime", help="onnxruntime | torch"),
    backend_option: Optional[list[str]] = typer.Option(None, help="KEY=VALUE for the backend (as in generate)."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", help="auto | float32 | float16 | bfloat16"),
    max_batch: int = typer.Option(8, help="Images per pipeline call (and per request)."),
    max_wait_ms: float = typer.Option(10.0, help="How long a request waits for others to batch with."),
    max_queue: int = typer.Option(256, help="Requests waiting at most; beyond: 503 with Retry-After."),
    timeout: float = typer.Option(60.0, help="Seconds per request, waiting included; beyond: 504."),
    max_steps: int = typer.Option(8, help="Largest 'steps' a request may ask for (or its sampler default to)."),
    max_size: Optional[int] = typer.Option(None, help="Largest height/width in pixels (default: the model's)."),
    api_key_env: Optional[str] = typer.Option(None, help="Name of an env var holding the API key clients send "
                                                         "as 'Authorization: Bearer KEY'."),
    expose_model_path: bool = typer.Option(False, help="Also put the model's filesystem path in replies and PNG "
                                                       "records (default: its name and sha256 only)."),
    body_timeout: float = typer.Option(10.0, help="Seconds for a request's whole body to arrive; beyond: 408."),
    header_timeout: float = typer.Option(10.0, help="Seconds for a connection to send a whole request head; "
                                                    "beyond: closed (idle and trickling connections)."),
    keep_alive_timeout: float = typer.Option(5.0, help="Seconds an idle keep-alive connection stays open."),
    max_header_bytes: int = typer.Option(16384, help="Largest request line + headers; beyond: 400."),
    limit_concurrency: Optional[int] = typer.Option(None, help="Open connections + requests in progress at most; "
                                                               "beyond: 503 (default: max-queue + max-batch + 64)."),
    shutdown_timeout: Optional[float] = typer.Option(None, help="Seconds SIGTERM waits for requests in flight "
                                                                "(default: --timeout + 1)."),
) -> None:
    """Serve MODEL over HTTP: POST /v1/generate, GET /healthz, /readyz, /metrics (docs/serving.md)."""
    from atdiff.runtime.serve.schema import ServeLimits
    _port(port)
    limits = ServeLimits(
        max_batch=_at_least(max_batch, 1, "--max-batch"), max_queue=_at_least(max_queue, 1, "--max-queue"),
        max_wait_ms=_duration(max_wait_ms, "--max-wait-ms", zero=True), timeout_s=_duration(timeout, "--timeout"),
        max_steps=_at_least(max_steps, 1, "--max-steps"), max_size=_optional(_at_least, max_size, 1, "--max-size"),
        body_timeout_s=_duration(body_timeout, "--body-timeout"),
        header_timeout_s=_duration(header_timeout, "--header-timeout"),
        keep_alive_s=_duration(keep_alive_timeout, "--keep-alive-timeout"),
        max_header_bytes=_at_least(max_header_bytes, 1024, "--max-header-bytes"),
        limit_concurrency=_optional(_at_least, limit_concurrency, 1, "--limit-concurrency"),
        shutdown_timeout_s=_optional(_duration, shutdown_timeout, "--shutdown-timeout", zero=True))
    api_key = _api_key(api_key_env)
    if api_key is None and not _loopback(host):
        typer.echo(f"warning: serving on {host} without an API key: anyone who can reach it can use it "
                   "(--api-key-env NAME)", err=True)
    run_server(model, limits, host=host, port=port, api_key=api_key, backend=backend, device=device, dtype=dtype,
               backend_options=backend_option or [], expose_model_path=expose_model_path)


def run_server(model: str, limits, *, host: str, port: int, api_key: str | None, backend: str, device: str,
               dtype: str, backend_options: list[str], expose_model_path: bool = False) -> None:
    from atdiff.runtime.cli_generate import parse_options
    from atdiff.runtime.pipeline import Pipeline
    from atdiff.runtime.serve.app import create_app, model_record
    from atdiff.runtime.serve.server import serve_forever
    with Pipeline.load(model, backend=backend, device=device, dtype=dtype, **parse_options(backend_options)) as pipe:
        app = create_app(pipe, limits, api_key=api_key, record=model_record(pipe, with_path=expose_model_path))
        typer.echo(f"serving {pipe.spec.name} ({pipe.source.path}) on {pipe.backend.describe()} at "
                   f"http://{host}:{port} (max batch {limits.max_batch}, max wait {limits.max_wait_ms:g} ms)", err=True)
        serve_forever(app, host=host, port=port)


def _at_least(value: int, low: int, name: str) -> int:
    if value < low:
        raise ToolkitError(f"{name} must be at least {low}, got {value}")
    return value


def _duration(value: float, name: str, *, zero: bool = False) -> float:
    """A finite duration (seconds or ms), above 0 (or 0 allowed with ``zero``): typer parses 'nan' and 'inf' as
    floats, and a timeout of 0, -1 or nan would make every request fail, or none ever time out."""
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        least = "0 or more" if zero else "more than 0"
        raise ToolkitError(f"{name} must be a finite number, {least}; got {value:g}")
    return value


def _optional(check, value, *args, **kwargs):
    """``check(value, ...)`` unless the option was not given (None: its default, which depends on other things)."""
    return None if value is None else check(value, *args, **kwargs)


def _port(port: int) -> int:
    if not 0 <= port <= 65535:
        raise ToolkitError(f"--port must be 0..65535, got {port}")
    return port


def _api_key(env_name: str | None) -> str | None:
    if env_name is None:
        return None
    key = os.environ.get(env_name, "")
    if not key:
        raise ToolkitError(f"--api-key-env {env_name}: the environment variable {env_name} is unset or empty; "
                           f"export {env_name}=... first")
    return key


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


__all__ = ["serve", "run_server"]

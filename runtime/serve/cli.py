"""``toolkit serve MODEL``: load once, warm up, serve HTTP until SIGTERM/Ctrl-C (then finish what is waiting).
This module imports only typer; FastAPI and uvicorn are imported when the command runs (`pip install '.[serve]'`)."""
from __future__ import annotations

import ipaddress
import os
from typing import Optional

import typer

from runtime.errors import ToolkitError


def serve(
    model: str = typer.Argument(..., help="Export directory (or diffusers dir with --backend torch)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; anything but loopback wants --api-key-env."),
    port: int = typer.Option(8000, help="TCP port."),
    backend: str = typer.Option("onnxruntime", help="onnxruntime | torch"),
    backend_option: Optional[list[str]] = typer.Option(None, help="KEY=VALUE for the backend (as in generate)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    dtype: str = typer.Option("auto", help="auto | float32 | float16 | bfloat16"),
    max_batch: int = typer.Option(8, help="Images per pipeline call (and per request)."),
    max_wait_ms: float = typer.Option(10.0, help="How long a request waits for others to batch with."),
    max_queue: int = typer.Option(256, help="Requests waiting at most; beyond: 503 with Retry-After."),
    timeout: float = typer.Option(60.0, help="Seconds per request, waiting included; beyond: 504."),
    max_steps: int = typer.Option(8, help="Largest 'steps' a request may ask for."),
    max_size: Optional[int] = typer.Option(None, help="Largest height/width in pixels (default: the model's)."),
    api_key_env: Optional[str] = typer.Option(None, help="Name of an env var holding the API key clients send "
                                                         "as 'Authorization: Bearer KEY'."),
) -> None:
    """Serve MODEL over HTTP: POST /v1/generate, GET /healthz, /readyz, /metrics (docs/serving.md)."""
    from runtime.serve.schema import ServeLimits
    limits = ServeLimits(max_batch=_at_least(max_batch, 1, "--max-batch"), max_wait_ms=max(0.0, max_wait_ms),
                         max_queue=_at_least(max_queue, 1, "--max-queue"), timeout_s=timeout,
                         max_steps=_at_least(max_steps, 1, "--max-steps"), max_size=max_size)
    api_key = _api_key(api_key_env)
    if api_key is None and not _loopback(host):
        typer.echo(f"warning: serving on {host} without an API key: anyone who can reach it can use it "
                   "(--api-key-env NAME)", err=True)
    run_server(model, limits, host=host, port=port, api_key=api_key, backend=backend, device=device, dtype=dtype,
               backend_options=backend_option or [])


def run_server(model: str, limits, *, host: str, port: int, api_key: str | None, backend: str, device: str,
               dtype: str, backend_options: list[str]) -> None:
    from runtime.cli_generate import parse_options
    from runtime.fingerprint import model_sha256
    from runtime.pipeline import Pipeline
    from runtime.serve.app import create_app
    from runtime.serve.server import serve_forever
    with Pipeline.load(model, backend=backend, device=device, dtype=dtype, **parse_options(backend_options)) as pipe:
        record = {"model": str(model), "model_sha256": model_sha256(pipe.source.path)}
        app = create_app(pipe, limits, api_key=api_key, record=record)
        typer.echo(f"serving {pipe.spec.name} ({pipe.source.path}) on {pipe.backend.describe()} at "
                   f"http://{host}:{port} (max batch {limits.max_batch}, max wait {limits.max_wait_ms:g} ms)", err=True)
        serve_forever(app, host=host, port=port, graceful_timeout_s=limits.timeout_s)


def _at_least(value: int, low: int, name: str) -> int:
    if value < low:
        raise ToolkitError(f"{name} must be at least {low}, got {value}")
    return value


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

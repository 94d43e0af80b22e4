"""User-facing errors: anything raised as a ``ToolkitError`` is bad input or a missing
requirement, and the CLI prints its message as one line on stderr (no traceback) and exits 2.
Messages say what was wrong and what to do, e.g. "export dir has no manifest.json; run 'toolkit export'"."""
from __future__ import annotations

import functools
import sys


class ToolkitError(Exception):
    """Bad input or a missing requirement; the message names the problem and the fix."""


def handles_errors(command):
    """Decorate a typer command so a ToolkitError becomes one stderr line and exit code 2."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        import typer  # imported lazily: runtime/ is embeddable without the CLI
        try:
            return command(*args, **kwargs)
        except ToolkitError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise typer.Exit(code=2) from None
    return wrapper

"""Schema checks for the JSON a model directory or an export holds (config.json, model_index.json,
scheduler_config.json, tokenizer_config.json, toolkit.json, manifest.json), with the standard library alone.

Files are untrusted: a crafted one must be one ``ModelFormatError`` (the CLI's ``error:`` line, exit 2), never a
traceback or gigabytes of memory. So ``read_json_object`` refuses what is not a small UTF-8 JSON object of bounded
nesting, and ``Config`` reads each key with a strict type (an int is not a bool, a float or a string; numbers are
finite) and, for every size the runtime allocates by, a range, before anything is allocated. Messages name the
file, the key, the value and what is allowed (docs/robustness.md, "Crafted configs").
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from atdiff.runtime.errors import ToolkitError

# Bounds on what configs and manifests may ask for. Real models are far inside them (Stable Diffusion: 1000
# timesteps, 77 tokens, 64x64 latents, 1280 channels); a crafted 1e9 fails here instead of in an allocation.
MAX_JSON_BYTES = 16 * 2**20          # scheduler configs with trained_betas are ~20 kB, manifests ~10 kB
MAX_JSON_DEPTH = 32                  # manifests nest 7 levels; deeper is crafted (and recursion-hungry)
MAX_TIMESTEPS = 100_000
MAX_TOKENS = 4096
MAX_SAMPLE_SIZE = 4096               # UNet sample size (latent or pixel side)
MAX_RESOLUTION = 8192                # default image side: sample_size x the VAE's scale factor
MAX_CHANNELS = 4096
MAX_BLOCKS = 8                       # UNet / VAE resolution levels (the scale factor is 2 ** (levels - 1))
MAX_LAYERS = 64                      # layers per block, attention heads, transformer layers
MAX_CLASSES = 100_000                # class embeddings, and integer fill bounds other than the vocabulary
MAX_VOCABULARY = 1_000_000
REQUIRED = object()                  # Config's default: the key must be present


class ModelFormatError(ToolkitError, ValueError):
    """A directory is not a model this toolkit can run; the message says what is missing."""


def read_json_object(path: Path, fix: str) -> dict:
    """``path`` parsed as a JSON object: at most MAX_JSON_BYTES, UTF-8, nested at most MAX_JSON_DEPTH levels,
    without NaN; else a ModelFormatError naming the file and ending with ``fix``."""
    path = Path(path)
    try:
        size = path.stat().st_size
        raw = path.read_bytes() if size <= MAX_JSON_BYTES else None   # never read a huge file whole
    except FileNotFoundError:
        raise ModelFormatError(f"missing {path}; {fix}") from None
    if raw is None:
        raise ModelFormatError(f"{path} is {size} bytes, more than a config may be ({MAX_JSON_BYTES}); {fix}")
    too_deep = False
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_refuse_nan)
    except UnicodeDecodeError as exc:
        raise ModelFormatError(f"{path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                               f"{exc.start}); {fix}") from None
    except _NaN:
        raise ModelFormatError(f"{path} holds NaN, which no config key takes; {fix}") from None
    except RecursionError:   # the C parser's own depth limit (~1000 levels): the message below
        data, too_deep = None, True
    except ValueError as exc:   # json.JSONDecodeError, and integers of more than 4300 digits
        raise ModelFormatError(f"{path} is not valid JSON ({str(exc)[:160]}); {fix}") from None
    if too_deep or _depth(data) > MAX_JSON_DEPTH:
        raise ModelFormatError(f"{path} is nested deeper than JSON configs are ({MAX_JSON_DEPTH} levels); {fix}")
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path} holds a JSON {json_type(data)}, not an object; {fix}")
    return data


class _NaN(Exception):
    """Raised by the parser's constant hook: NaN is refused (-Infinity stays: diffusers writes it for
    DPM-Solver's lambda_min_clipped)."""


def _refuse_nan(constant: str) -> float:
    if constant == "NaN":
        raise _NaN
    return float(constant)


def _depth(value) -> int:
    """Nesting depth of a parsed JSON value, walked without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if level <= MAX_JSON_DEPTH and isinstance(item, (dict, list)):
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


@dataclasses.dataclass(frozen=True)
class Config:
    """One JSON object and where it came from: typed, bounded reads of its keys, each failing with a message
    "FILE: 'KEY' is VALUE; expected WHAT; FIX"."""
    data: dict
    source: str                       # the file (or "manifest.json of EXPORT")
    fix: str                          # what to do, e.g. "re-run 'toolkit export'"
    prefix: str = ""                  # key path inside the file, e.g. "spec."

    def error(self, key: str, value, expected: str) -> ModelFormatError:
        shown = "missing" if value is REQUIRED else f"{short_repr(value)}"
        return ModelFormatError(f"{self.source}: '{self.prefix}{key}' is {shown}; expected {expected}; {self.fix}")

    def _get(self, key: str, default, expected: str):
        if key not in self.data:
            if default is REQUIRED:
                raise self.error(key, REQUIRED, expected)
            return default, True
        return self.data[key], False

    def section(self, key: str, default=REQUIRED) -> "Config":
        """The nested object ``key`` (``default``: a dict used when absent)."""
        value, _ = self._get(key, default, "a JSON object")
        if not isinstance(value, dict):
            raise self.error(key, value, "a JSON object")
        return dataclasses.replace(self, data=value, prefix=f"{self.prefix}{key}.")

    def integer(self, key: str, low: int, high: int, default=REQUIRED, *, nullable: bool = False) -> int | None:
        expected = f"an integer in {low}..{high}" + (" or null" if nullable else "")
        value, absent = self._get(key, default, expected)
        if absent or (value is None and nullable):
            return value
        if not is_int(value) or not low <= value <= high:
            raise self.error(key, value, expected)
        return value

    def number(self, key: str, low: float, high: float, default=REQUIRED, *, nullable: bool = False) -> float | None:
        """A finite int or float in [low, high] (an infinite bound admits that infinity)."""
        expected = f"a number in [{low}, {high}]" + (" or null" if nullable else "")
        value, absent = self._get(key, default, expected)
        if absent or (value is None and nullable):
            return value
        if not is_number(value) or not low <= value <= high:
            raise self.error(key, value, expected)
        try:
            return float(value)
        except OverflowError:   # an integer of hundreds of digits, under an infinite bound
            raise self.error(key, value, expected) from None

    def flag(self, key: str, default=REQUIRED) -> bool:
        value, absent = self._get(key, default, "true or false")
        if not absent and not isinstance(value, bool):
            raise self.error(key, value, "true or false")
        return value

    def text(self, key: str, default=REQUIRED, *, choices=None, nullable: bool = False,
             max_length: int = 256) -> str | None:
        expected = (f"one of {', '.join(choices)}" if choices else f"a string of at most {max_length} characters") \
            + (" or null" if nullable else "")
        value, absent = self._get(key, default, expected)
        if absent or (value is None and nullable):
            return value
        if not isinstance(value, str) or len(value) > max_length or (choices and value not in choices):
            raise self.error(key, value, expected)
        return value

    def integers(self, key: str, low: int, high: int, max_items: int, default=REQUIRED, *,
                 scalar: bool = False, nullable: bool = False) -> list[int] | int | None:
        """A list of 1..max_items integers in low..high (with ``scalar``, a single such integer also does)."""
        expected = ((f"an integer in {low}..{high} or a list of 1 to {max_items} of them" if scalar
                     else f"a list of 1 to {max_items} integers in {low}..{high}") + (", or null" if nullable else ""))
        value, absent = self._get(key, default, expected)
        if absent or (value is None and nullable):
            return value
        if scalar and is_int(value) and low <= value <= high:
            return value
        if (not isinstance(value, (list, tuple)) or not 1 <= len(value) <= max_items
                or not all(is_int(v) and low <= v <= high for v in value)):
            raise self.error(key, value, expected)
        return list(value)


def is_int(value) -> bool:
    """A JSON integer: Python int, but not bool (``true`` is not 1 here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A JSON number that is not NaN: int or float, not bool."""
    return is_int(value) or (isinstance(value, float) and not math.isnan(value))


def json_type(value) -> str:
    """The JSON name of a parsed value's type (what the file says, not Python's name for it)."""
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def short_repr(value) -> str:
    """repr(value), cut to 60 characters (a crafted value may be megabytes)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."

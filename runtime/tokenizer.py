"""Prompt -> token ids, without torch.

A directory with ``tokenizer.json`` (what ``save_pretrained`` and our exports write) is read with the
``tokenizers`` library alone, which keeps the ONNX Runtime path free of torch and transformers. Hub
Stable Diffusion repos ship only vocab.json + merges.txt, so those go through transformers' CLIPTokenizer.
A folder with neither (or an empty vocabulary) is refused: loaded anyway, it maps every prompt to the same ids.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from atdiff.runtime.config_checks import MAX_TOKENS, is_int, read_json_object
from atdiff.runtime.errors import ToolkitError


class PromptTokenizer:
    def __init__(self, tokenizer_dir: str | Path, max_length: int):
        if not is_int(max_length) or not 1 <= max_length <= MAX_TOKENS:   # every prompt is padded to it
            raise ToolkitError(f"tokenizer max_length {max_length!r} is not an integer in 1..{MAX_TOKENS}; "
                               f"fix the model's tokenizer_max_length (re-run 'toolkit export')")
        self.max_length = max_length
        tokenizer_dir = Path(tokenizer_dir)
        if vocabulary_file(tokenizer_dir).name == FAST_FILE:
            self._encode = self._fast(tokenizer_dir)
        else:
            self._encode = self._transformers(tokenizer_dir)

    def _fast(self, tokenizer_dir: Path):
        tok = _read_fast(tokenizer_dir / FAST_FILE)
        _require_tokens(tok.get_vocab_size(), tokenizer_dir / FAST_FILE)
        pad_token = _pad_token(tokenizer_dir)
        counter = _read_fast(tokenizer_dir / FAST_FILE)
        counter.no_truncation()
        counter.no_padding()
        self._count = lambda prompts: [len(e.ids) for e in counter.encode_batch(list(prompts))]
        tok.enable_truncation(self.max_length)
        tok.enable_padding(length=self.max_length, pad_id=tok.token_to_id(pad_token), pad_token=pad_token)
        return lambda prompts: [e.ids for e in tok.encode_batch(list(prompts))]

    def _transformers(self, tokenizer_dir: Path):
        from transformers import CLIPTokenizer
        tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
        _require_tokens(len(tok.encoder), tokenizer_dir / SLOW_FILES[0])
        self._count = lambda prompts: [len(ids) for ids in tok(list(prompts), truncation=False).input_ids]
        return lambda prompts: tok(list(prompts), padding="max_length", max_length=self.max_length,
                                   truncation=True).input_ids

    def too_long(self, prompts: Sequence[str]) -> dict[int, int]:
        """{prompt index: its token count} for the prompts the text encoder will see cut to ``max_length``
        (counts include the start and end tokens)."""
        return {i: n for i, n in enumerate(self._count(prompts)) if n > self.max_length}

    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        """Token ids [B, max_length] int64, padded and truncated as Stable Diffusion's pipelines do."""
        return np.asarray(self._encode(prompts), dtype=np.int64)


FAST_FILE = "tokenizer.json"
SLOW_FILES = ("vocab.json", "merges.txt")    # what CLIPTokenizer reads when there is no tokenizer.json


def vocabulary_file(tokenizer_dir: Path) -> Path:
    """The file the vocabulary comes from (tokenizer.json, else vocab.json beside merges.txt); a ToolkitError
    naming the folder and the missing file when there is none."""
    tokenizer_dir = Path(tokenizer_dir)
    if not tokenizer_dir.is_dir():
        raise ToolkitError(f"{tokenizer_dir} is missing: a text-to-image model needs its tokenizer/ directory")
    if (tokenizer_dir / FAST_FILE).is_file():
        return tokenizer_dir / FAST_FILE
    missing = [name for name in SLOW_FILES if not (tokenizer_dir / name).is_file()]
    if missing:
        raise ToolkitError(f"tokenizer folder {tokenizer_dir} has no vocabulary: it lacks {FAST_FILE} and "
                           f"{' and '.join(missing)}; copy the model's tokenizer files into it")
    return tokenizer_dir / SLOW_FILES[0]


def _read_fast(path: Path):
    """``tokenizers.Tokenizer`` from ``path``; a file it cannot parse is a ToolkitError naming it (the library raises a
    bare Exception with the parser's message)."""
    from tokenizers import Tokenizer
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - tokenizers' only error type
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ToolkitError(f"tokenizer file {path} cannot be read ({first}); copy the model's tokenizer files "
                           "there again") from None


def _require_tokens(count: int, path: Path) -> None:
    if count == 0:
        raise ToolkitError(f"tokenizer file {path} has an empty vocabulary; copy the model's tokenizer files there")


def _pad_token(tokenizer_dir: Path) -> str:
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = tokenizer_dir / name
        if path.exists():
            pad = read_json_object(path, "copy the model's tokenizer files there again").get("pad_token")
            if isinstance(pad, dict):
                pad = pad.get("content")
            if isinstance(pad, str) and pad:
                return pad
    return "<|endoftext|>"

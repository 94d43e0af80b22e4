"""Write the real CLIP BPE tokenizer offline, from open_clip's copy of it.

Hub tokenizers (``openai/clip-vit-large-patch14``) cannot be downloaded here, but open_clip ships OpenAI's
tokenizer (``open_clip.tokenizer.SimpleTokenizer``: the 49408-token vocab and the BPE merges that Stable
Diffusion / LCM text encoders use). Its vocabulary and merge ranks are written as ``vocab.json`` + ``merges.txt``
so transformers' ``CLIPTokenizer`` loads it like a hub tokenizer (identical files to the hub's vocab).
"""
from __future__ import annotations

import json
from pathlib import Path

MAX_LENGTH = 77
# open_clip spells the specials <start_of_text> / <end_of_text>; transformers' CLIPTokenizer and every SD
# tokenizer on the hub spell them <|startoftext|> / <|endoftext|> (same ids, 49406 / 49407)
_SPECIALS = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}


def write_clip_tokenizer(out_dir: str | Path, max_length: int = MAX_LENGTH) -> Path:
    """Write a transformers CLIPTokenizer (vocab.json, merges.txt, configs) to ``out_dir``."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    simple = SimpleTokenizer()
    vocab = {_SPECIALS.get(token, token): index for token, index in simple.encoder.items()}
    merges = [" ".join(pair) for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda item: item[1])]
    (out_dir / "vocab.json").write_text(json.dumps(vocab))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(out_dir / "vocab.json"), str(out_dir / "merges.txt"), model_max_length=max_length,
                              pad_token="<|endoftext|>")
    tokenizer.save_pretrained(out_dir)
    return out_dir

"""Build the real CLIP BPE tokenizer offline.

Hub tokenizers (``openai/clip-vit-large-patch14``) cannot be downloaded here, but open_clip ships the
same BPE merges (``bpe_simple_vocab_16e6.txt.gz``). The vocabulary is derived from them exactly as
OpenAI's ``SimpleTokenizer`` does (byte alphabet, byte+``</w>`` alphabet, merges, two specials), which
gives the 49408-token vocab that Stable Diffusion / LCM text encoders use. We write it as
``vocab.json`` + ``merges.txt`` so transformers' ``CLIPTokenizer`` loads it like a hub tokenizer.
"""
from __future__ import annotations

import gzip
import json
from importlib import resources
from pathlib import Path

NUM_MERGES = 49152 - 256 - 2  # as in OpenAI CLIP's simple_tokenizer.py
MAX_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    # Identical to CLIP's bytes_to_unicode: printable bytes map to themselves, the rest to 256+n.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _open_clip_merges() -> list[str]:
    path = resources.files("open_clip") / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    return lines[1:NUM_MERGES + 1]


def write_clip_tokenizer(out_dir: str | Path, max_length: int = MAX_LENGTH) -> Path:
    """Write a transformers CLIPTokenizer (vocab.json, merges.txt, configs) to ``out_dir``."""
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merges = _open_clip_merges()
    alphabet = list(_bytes_to_unicode().values())
    vocab = alphabet + [a + "</w>" for a in alphabet] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out_dir / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(out_dir / "vocab.json"), str(out_dir / "merges.txt"), model_max_length=max_length,
                              pad_token="<|endoftext|>")
    tokenizer.save_pretrained(out_dir)
    return out_dir

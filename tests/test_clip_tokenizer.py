"""The offline CLIP tokenizer (train/core/clip_tokenizer.py) tokenizes exactly as open_clip's copy of OpenAI's."""
from __future__ import annotations

import pytest


@pytest.mark.parametrize("text", ["astronaut in a jungle", "a black and white picture of an ankle boot",
                                  "Ünïcode, punctuation!? and   spaces", ""])
def test_written_tokenizer_matches_open_clip(tmp_path, text):
    import open_clip
    from transformers import CLIPTokenizer

    from atdiff.train.core.clip_tokenizer import write_clip_tokenizer
    ours = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path / "tokenizer"))
    ids = ours(text, padding="max_length", max_length=77, truncation=True).input_ids
    reference = open_clip.tokenize([text])[0].tolist()   # pads with 0 after <end_of_text>
    length = reference.index(49407) + 1
    assert ids[:length] == reference[:length]
    assert ours.vocab_size == 49408 and ours.pad_token_id == 49407

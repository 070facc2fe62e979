import sys
import types
from typing import ClassVar

import numpy as np
import pytest

from longloom.data.tokenize import BOS_ID, BYTE_VOCAB_SIZE, EOS_ID, PAD_ID, ByteTokenizer, load_tokenizer


def test_byte_tokenizer_round_trips_any_text():
    tokenizer = load_tokenizer("bytes")
    text = "plain ascii, ünïcödé, 汉字, emoji 🧶, tabs\tand\r\nnewlines"
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int32
    assert ids.tolist() == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text


def test_byte_tokenizer_specials_and_vocabulary():
    tokenizer = ByteTokenizer()
    assert (BOS_ID, EOS_ID, PAD_ID, BYTE_VOCAB_SIZE) == (256, 257, 258, 259)
    assert tokenizer.vocab_size == 259 and tokenizer.eos_id == 257
    # Specials and ignored labels are not text: decoding drops them.
    assert tokenizer.decode([BOS_ID, *b"ab", EOS_ID, PAD_ID, -100]) == "ab"


def test_unknown_tokenizer_path_names_the_choices(tmp_path):
    with pytest.raises(ValueError, match="neither 'bytes' nor an existing local path"):
        load_tokenizer(tmp_path / "missing")


def test_missing_transformers_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ValueError, match="transformers is not installed"):
        load_tokenizer(tmp_path)


class _RecordingAutoTokenizer:
    calls: ClassVar[list] = []

    def __init__(self):
        self.eos_token_id = 2
        self.bos_token_id = 1
        self.pad_token_id = None

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        cls.calls.append((path, kwargs))
        return cls()

    def __len__(self):
        return 1000

    def encode(self, text, add_special_tokens):
        assert add_special_tokens is False
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens):
        return "".join(chr(i) for i in ids)


def test_hf_tokenizer_loads_locally_only(tmp_path, monkeypatch):
    fake = types.ModuleType("transformers")
    fake.AutoTokenizer = _RecordingAutoTokenizer
    monkeypatch.setitem(sys.modules, "transformers", fake)
    tokenizer = load_tokenizer(str(tmp_path))
    assert _RecordingAutoTokenizer.calls == [(str(tmp_path), {"local_files_only": True})]
    assert (tokenizer.vocab_size, tokenizer.eos_id) == (1000, 2)
    assert tokenizer.encode("hi").tolist() == [104, 105]
    assert tokenizer.decode(tokenizer.encode("hi")) == "hi"

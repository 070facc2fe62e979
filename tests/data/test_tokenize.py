import io
import json
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
    assert _RecordingAutoTokenizer.calls == [
        (str(tmp_path), {"local_files_only": True, "trust_remote_code": False})
    ]
    assert (tokenizer.vocab_size, tokenizer.eos_id) == (1000, 2)
    assert tokenizer.encode("hi").tolist() == [104, 105]
    assert tokenizer.decode(tokenizer.encode("hi")) == "hi"


def _folder_with_custom_code(folder, config_name="tokenizer_config.json"):
    """A tokenizer folder whose auto_map points at its own module; importing it writes a marker file."""
    folder.mkdir()
    marker = folder / "CODE-RAN"
    (folder / "evil_tokenizer.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n"
    )
    settings = {"auto_map": {"AutoTokenizer": ["evil_tokenizer.EvilTokenizer", None]}, "eos_token": "</s>"}
    (folder / config_name).write_text(json.dumps(settings))
    return marker


@pytest.mark.parametrize("config_name", ["tokenizer_config.json", "config.json"])
def test_tokenizer_folder_with_custom_code_is_refused_and_no_code_runs(tmp_path, config_name, monkeypatch):
    marker = _folder_with_custom_code(tmp_path / "tok", config_name)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))  # a "[y/N]" prompt would read this
    with pytest.raises(
        ValueError, match=rf"needs custom Python code to load \(auto_map in {config_name}.*never runs"
    ):
        load_tokenizer(tmp_path / "tok")
    assert not marker.exists()


def test_custom_code_is_refused_by_transformers_too_when_not_declared_where_we_look(tmp_path):
    """Belt and braces: transformers itself gets trust_remote_code=False."""
    pytest.importorskip("transformers")
    marker = _folder_with_custom_code(tmp_path / "tok", "tokenizer_config.json")
    # Hide the auto_map from our own check; transformers finds it and must refuse rather than ask or run it.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("longloom.data.tokenize.CUSTOM_CODE_FILES", ())
        with pytest.raises(
            ValueError, match=r"cannot load a Hugging Face tokenizer from .*tok' \(transformers:"
        ):
            load_tokenizer(tmp_path / "tok")
    assert not marker.exists()


def test_a_plain_tokenizer_json_folder_loads(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"<unk>": 0, "</s>": 1, "hello": 2, "world": 3}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=model, eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(tmp_path / "plain")
    tokenizer = load_tokenizer(tmp_path / "plain")
    assert tokenizer.encode("hello world").tolist() == [2, 3]
    assert (tokenizer.eos_id, tokenizer.vocab_size) == (1, 4)

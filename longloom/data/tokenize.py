"""Tokenizers: a byte-level default that needs no download, and Hugging Face tokenizers from a local path.

The byte tokenizer maps UTF-8 bytes to ids 0..255 and adds three specials, BOS=256, EOS=257, PAD=258
(vocabulary 259, the default `model.vocab_size`). Every text round-trips exactly, and the synthetic
tasks and the CPU demo run without any files. A Hugging Face tokenizer is loaded with
`local_files_only=True`: preparing data never touches the network. It is also loaded with
`trust_remote_code=False`, and a folder that asks for custom code (an `auto_map` in its
tokenizer_config.json or config.json) is refused up front: code from a data, tokenizer or model folder
never runs, and transformers never stops to ask "[y/N]".
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

BYTE_VOCAB_SIZE = 259
BOS_ID = 256
EOS_ID = 257
PAD_ID = 258


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    name: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text` without special tokens, int32 [n]."""
        ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus BOS, EOS and PAD."""

    name = "bytes"
    vocab_size = BYTE_VOCAB_SIZE
    bos_id = BOS_ID
    eos_id = EOS_ID
    pad_id = PAD_ID

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of the byte ids; specials (and -100 labels) are dropped, broken UTF-8 shows as U+FFFD."""
        ids = np.asarray(ids)
        return ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer behind the same small interface as `ByteTokenizer`."""

    def __init__(self, path: str | Path):
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ValueError(
                f"tokenizer {str(path)!r} is a Hugging Face tokenizer but transformers is not installed: "
                "`pip install transformers`, or use the default tokenizer 'bytes'"
            ) from None
        self.name = str(path)
        refuse_custom_code(Path(path), what="tokenizer")
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(
                str(path), local_files_only=True, trust_remote_code=False
            )
        except (OSError, ValueError, KeyError, TypeError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(
                f"cannot load a Hugging Face tokenizer from {self.name!r} (transformers: {first_line}): pass a "
                "folder with tokenizer.json / tokenizer_config.json, or the default tokenizer 'bytes'"
            ) from None
        eos_id = self._tokenizer.eos_token_id
        if eos_id is None:
            raise ValueError(
                f"tokenizer {self.name!r} has no EOS token (documents end with EOS): "
                "choose a tokenizer that defines eos_token"
            )
        self.eos_id = int(eos_id)
        self.bos_id = self._tokenizer.bos_token_id
        self.pad_id = self._tokenizer.pad_token_id
        self.vocab_size = len(self._tokenizer)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=False), dtype=np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tokenizer.decode(np.asarray(ids).tolist(), skip_special_tokens=True)


# Files through which a Hugging Face folder asks transformers to import Python code that comes with it.
CUSTOM_CODE_FILES = ("tokenizer_config.json", "config.json", "preprocessor_config.json")


def refuse_custom_code(folder: Path, what: str) -> None:
    """ValueError when a local Hugging Face folder needs its own Python code (auto_map) to load."""
    if not folder.is_dir():
        return
    for name in CUSTOM_CODE_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            settings = json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(
                f"{path} is not valid JSON ({error}): fix or replace the {what} folder"
            ) from None
        if isinstance(settings, dict) and settings.get("auto_map"):
            classes = (
                ", ".join(sorted({str(v) for v in settings["auto_map"].values()}))
                if isinstance(settings["auto_map"], dict)
                else str(settings["auto_map"])
            )
            raise ValueError(
                f"the {what} folder {str(folder)!r} needs custom Python code to load (auto_map in {name}: "
                f"{classes}); longloom never runs code that comes with data, tokenizer or model folders: use "
                f"a {what} that transformers supports without custom code (e.g. a folder with a tokenizer.json "
                "of the same vocabulary)"
            )


def load_tokenizer(spec: str | Path = "bytes") -> ByteTokenizer | HFTokenizer:
    """'bytes' (default) or the path of a local Hugging Face tokenizer folder."""
    if str(spec) == "bytes":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if not path.exists():
        raise ValueError(
            f"tokenizer {str(spec)!r} is neither 'bytes' nor an existing local path: pass 'bytes' or the "
            "folder of a Hugging Face tokenizer (tokenizer.json / tokenizer_config.json); nothing is downloaded"
        )
    return HFTokenizer(path)

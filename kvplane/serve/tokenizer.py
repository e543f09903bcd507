"""Tokenizers of the reference server: byte-level by default, or a checkpoint's own.

The byte tokenizer needs no files: token = BOS, then each UTF-8 byte ``b`` as ``b +
BYTE_OFFSET``. Prompts of any language round-trip, and the token count of a text is its
byte length plus one, which makes chunk boundaries easy to reason about in tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

__all__ = ["BYTE_VOCAB_SIZE", "ByteTokenizer", "CheckpointTokenizer", "Tokenizer"]

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_OFFSET = 3
#: 3 specials + 256 bytes, rounded up to a multiple of 64.
BYTE_VOCAB_SIZE = 320


class Tokenizer(Protocol):
    bos_token_id: int | None
    eos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    bos_token_id: int | None = BOS_ID
    eos_token_id: int | None = EOS_ID
    vocab_size = BYTE_VOCAB_SIZE

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        body = [b + BYTE_OFFSET for b in text.encode("utf-8")]
        return [BOS_ID, *body] if add_special_tokens else body

    def decode(self, ids: list[int]) -> str:
        # Ids above the byte range (the model's padding rows) and specials decode to nothing.
        data = bytes(i - BYTE_OFFSET for i in ids if BYTE_OFFSET <= i < BYTE_OFFSET + 256)
        return data.decode("utf-8", errors="replace")


class CheckpointTokenizer:
    """A local checkpoint's tokenizer (transformers' AutoTokenizer, no download)."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self.bos_token_id = self._tok.bos_token_id
        self.eos_token_id = self._tok.eos_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=True))

"""Byte tokenizer: one token per UTF-8 byte, shifted past two special ids.

Token id b + 2 stands for byte b; id 0 is padding and id 1 ends a document. This is the convention of
`google/reformer-enwik8` (vocabulary 258, ids below 2 decode to nothing), so the same functions serve that
model and this project's `models/byte-lm`.
"""

from __future__ import annotations

from collections.abc import Iterable

PAD_ID = 0
EOS_ID = 1
BYTE_OFFSET = 2
VOCAB_SIZE = 256 + BYTE_OFFSET


def encode(text: str | bytes, add_eos: bool = False) -> list[int]:
    """Token ids of `text` (a str is UTF-8 encoded first), optionally followed by EOS_ID."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    ids = [byte + BYTE_OFFSET for byte in data]
    return ids + [EOS_ID] if add_eos else ids


def decode_bytes(ids: Iterable[int]) -> bytes:
    """The bytes behind `ids`; special ids (padding, EOS) decode to nothing."""
    ids = [int(token) for token in ids]
    out_of_range = [token for token in ids if not 0 <= token < VOCAB_SIZE]
    if out_of_range:
        raise ValueError(f"token id {out_of_range[0]} is outside the byte vocabulary 0..{VOCAB_SIZE - 1}")
    return bytes(token - BYTE_OFFSET for token in ids if token >= BYTE_OFFSET)


def decode(ids: Iterable[int]) -> str:
    """Text of `ids`; bytes that are not valid UTF-8 (a generated sequence may cut a character in two)
    become U+FFFD."""
    return decode_bytes(ids).decode("utf-8", errors="replace")

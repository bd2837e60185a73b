"""Tokenizers: text to a model's token ids and back.

The byte tokenizer (the module's functions `encode`, `decode`, `decode_bytes`): one token per UTF-8 byte,
shifted past two special ids. Token id b + 2 stands for byte b; id 0 is padding and id 1 ends a document. This
is the convention of `google/reformer-enwik8` (vocabulary 258, ids below 2 decode to nothing), so the same
functions serve that model and this project's `models/byte-lm`.

`Tokenizer`, one object for every kind of model, which `reformer.runtime` and eager `reformer.generation` take:
`ByteTokenizer` over those functions, or a checkpoint's own tokenizer files, as transformers' `save_pretrained`
of a `ReformerTokenizer` writes them (TOKENIZER_FILES): `tokenizer.json` through the `tokenizers` library (what
transformers' tokenizers and JavaScript apps read) or `spiece.model` through `sentencepiece`, both of the
optional `text` extra. `load_tokenizer(directory, vocab_size)` picks one for a checkpoint directory or an
exported generation folder (exporters carry the files); `tokenizer_metadata` and `files_from_metadata` put the
files in a single graph's string metadata and back. `text_generation` is text in, text out over a generator.
"""

from __future__ import annotations

import base64
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence

from .messages import first_line

PAD_ID = 0
EOS_ID = 1
BYTE_OFFSET = 2
VOCAB_SIZE = 256 + BYTE_OFFSET

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "spiece.model"
# What transformers' save_pretrained of a ReformerTokenizer(Fast) writes; exports carry each one a checkpoint has.
TOKENIZER_FILES = (TOKENIZER_JSON, SENTENCEPIECE_MODEL, "tokenizer_config.json", "special_tokens_map.json")
# Graph metadata holds strings: spiece.model (binary) goes there as base64 under its name plus this suffix.
BASE64_SUFFIX = ".base64"
TEXT_EXTRA = "pip install 'reformer-export[text]'"


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


class TokenizerError(ValueError):
    """Tokenizer files that cannot be read or do not fit the model, or a library they need that is missing."""


class Tokenizer(ABC):
    """Text to one model's token ids and back. `source` names what it reads (a file name, or "bytes")."""

    source: str
    vocab_size: int

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """The ids of `text`, as the model's own tokenizer gives them."""

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; special tokens (padding, end of text) decode to nothing. ValueError for an id
        outside the tokenizer's vocabulary."""
        ids = [int(token) for token in ids]
        outside = [token for token in ids if not 0 <= token < self.vocab_size]
        if outside:
            raise ValueError(f"token id {outside[0]} is outside the vocabulary of {self.source} "
                             f"(0..{self.vocab_size - 1})")
        return self.decode_known(ids)

    @abstractmethod
    def decode_known(self, ids: list[int]) -> str:
        """decode, for ids inside the vocabulary."""


class ByteTokenizer(Tokenizer):
    """The byte tokenizer (the module's functions) as a Tokenizer."""

    source = "bytes"
    vocab_size = VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        return encode(text)

    def decode_known(self, ids: list[int]) -> str:
        return decode(ids)


class JsonTokenizer(Tokenizer):
    """tokenizer.json through the tokenizers library: the ids of transformers' tokenizer for the file (special
    tokens added where the file's post-processor adds them)."""

    source = TOKENIZER_JSON
    library = "tokenizers"

    def __init__(self, content: bytes):
        tokenizers = text_library(self.library)
        self.tokenizer = tokenizers.Tokenizer.from_str(content.decode("utf-8"))
        self.vocab_size = self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode_known(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class SentencePieceTokenizer(Tokenizer):
    """spiece.model through sentencepiece (no begin or end token added; control tokens decode to nothing)."""

    source = SENTENCEPIECE_MODEL
    library = "sentencepiece"

    def __init__(self, content: bytes):
        sentencepiece = text_library(self.library)
        self.processor = sentencepiece.SentencePieceProcessor(model_proto=content)
        self.vocab_size = self.processor.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text)

    def decode_known(self, ids: list[int]) -> str:
        return self.processor.decode(ids)


# Which Tokenizer reads each file, in the order load_tokenizer prefers them: tokenizer.json first, the file
# transformers and JavaScript apps read, so that every runtime tokenizes alike.
FILE_TOKENIZERS = {TOKENIZER_JSON: JsonTokenizer, SENTENCEPIECE_MODEL: SentencePieceTokenizer}


def text_library(name: str):
    """The module `name` (tokenizers or sentencepiece), or TokenizerError saying how to install it."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise TokenizerError(f"reading a checkpoint's tokenizer needs the {name} library: {TEXT_EXTRA}") from None


def file_tokenizer(name: str, content: bytes, vocab_size: int | None, where: str) -> Tokenizer:
    """The Tokenizer of tokenizer file `name` (a FILE_TOKENIZERS key) of a model with `vocab_size` ids (None:
    not known); where: the file's folder or graph, for messages. TokenizerError, in one line, for a file that
    does not parse or has more tokens than the model."""
    try:
        tokenizer = FILE_TOKENIZERS[name](content)
    except TokenizerError:
        raise
    except Exception as error:  # each library raises its own kinds (and Rust panics); one line with the reason
        raise TokenizerError(f"cannot read {name} of {where}: {first_line(error)}") from None
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise TokenizerError(f"{name} of {where} has {tokenizer.vocab_size} tokens, more than the model's "
                             f"vocab_size {vocab_size}: it belongs to another model")
    return tokenizer


def tokenizer_from_files(files: Mapping[str, bytes], vocab_size: int | None, where: str) -> Tokenizer | None:
    """The tokenizer of a model with `vocab_size` ids (None: not known) from its tokenizer files (names to
    contents): the first of FILE_TOKENIZERS it has, else ByteTokenizer for a byte vocabulary (VOCAB_SIZE ids),
    else None."""
    for name in FILE_TOKENIZERS:
        if name in files:
            return file_tokenizer(name, files[name], vocab_size, where)
    return ByteTokenizer() if vocab_size == VOCAB_SIZE else None


def read_tokenizer_files(directory: str | os.PathLike) -> dict[str, bytes]:
    """The TOKENIZER_FILES in `directory`, names to contents."""
    files = {}
    for name in TOKENIZER_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, "rb") as handle:
                files[name] = handle.read()
    return files


def load_tokenizer(directory: str | os.PathLike, vocab_size: int) -> Tokenizer | None:
    """The tokenizer of the checkpoint directory or exported generation folder `directory`, whose model has
    `vocab_size` ids (see tokenizer_from_files); TokenizerError for bad files or a missing library."""
    return tokenizer_from_files(read_tokenizer_files(directory), vocab_size, os.fspath(directory))


def tokenizer_metadata(files: Mapping[str, bytes]) -> dict[str, str]:
    """Tokenizer files as string metadata entries: each text file under its own name, spiece.model as base64
    under `spiece.model.base64`."""
    entries = {}
    for name, content in files.items():
        if name == SENTENCEPIECE_MODEL:
            entries[name + BASE64_SUFFIX] = base64.b64encode(content).decode("ascii")
        else:
            entries[name] = content.decode("utf-8")
    return entries


def files_from_metadata(metadata: Mapping[str, str]) -> dict[str, bytes]:
    """The tokenizer files tokenizer_metadata put in `metadata` (other entries are left out)."""
    files = {name: metadata[name].encode("utf-8") for name in TOKENIZER_FILES if name in metadata}
    encoded = metadata.get(SENTENCEPIECE_MODEL + BASE64_SUFFIX)
    if encoded is not None:
        files[SENTENCEPIECE_MODEL] = base64.b64decode(encoded)
    return files


def is_text(value) -> bool:
    """Whether `value` is a text or a list of texts (rather than token ids)."""
    return isinstance(value, str) or (isinstance(value, (list, tuple)) and bool(value)
                                      and all(isinstance(row, str) for row in value))


def prompt_ids(tokenizer: Tokenizer | None, texts: str | Sequence[str]) -> list[list[int]]:
    """The ids of one text or of each of a list of texts; TokenizerError without a tokenizer."""
    if tokenizer is None:
        raise TokenizerError("this model has no tokenizer (no tokenizer.json or spiece.model, and not a byte "
                             "vocabulary): give token ids")
    return [tokenizer.encode(text) for text in ([texts] if isinstance(texts, str) else texts)]


def text_generation(generate: Callable, tokenizer: Tokenizer | None, prompts: str | Sequence[str],
                    max_new_tokens: int, options: dict) -> str | list[str]:
    """Text in, text out over `generate(ids, max_new_tokens, **options)`, which returns the prompts (left-padded
    to the longest) followed by the new tokens, as `OnnxGenerator.generate` and eager `generate` do. Each
    prompt's text followed by its new text, up to the end token where options name one (`eos_token_id`): the
    decoding of its ids and new ids, as transformers users decode a generated row. A list for a list."""
    rows = prompt_ids(tokenizer, prompts)
    sequences = generate(rows, max_new_tokens, **options).tolist()
    longest = max(len(row) for row in rows)
    eos = options.get("eos_token_id")
    texts = []
    for row, sequence in zip(rows, sequences):
        new = sequence[longest:]
        if eos in new:
            new = new[: new.index(eos)]
        texts.append(tokenizer.decode(row + new))
    return texts[0] if isinstance(prompts, str) else texts

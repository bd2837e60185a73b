"""The tokenizer files of a checkpoint directory (reformer.tokenizer.TOKENIZER_FILES, as transformers'
save_pretrained of a ReformerTokenizer or ReformerTokenizerFast writes them), as exports carry them:

- the causal-lm-with-past folder: the files themselves beside decoder_config.json, which lists them under
  `tokenizer_files` (reformer.runtime.OnnxGenerator reads them there, and a JavaScript app reads tokenizer.json);
- a Triton repository: a generation model's `graphs/` folder is that folder; a task model's graph carries them
  as a single graph does;
- a single graph: string metadata entries (reformer.tokenizer.tokenizer_metadata: each text file under its
  name, `spiece.model.base64`), in ONNX metadata_props and in the JSON description a TorchScript file or an
  AOTInductor package embeds. The graph stays one self-contained file: ONNX Runtime gives the entries to
  Python (reformer.runtime.OnnxModel.tokenizer), C, C++, C#, Java and Go apps as the custom metadata map, and
  tokenizers' `Tokenizer.from_str` reads tokenizer.json from it (onnxruntime-node and -web expose no model
  metadata: JavaScript apps take the generation folder).

Where a checkpoint has spiece.model and no tokenizer.json, the export writes tokenizer.json from it with the
tokenizers library's SentencePiece converter (it converts Unigram models), checked to give sentencepiece's ids
on the vocabulary's own text; where it cannot, the export's notes say that JavaScript apps need a tokenizer.json.
Every file is checked with its library (the `text` extra) where installed; a bad one fails the export in one line."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field

from reformer.tokenizer import (
    FILE_TOKENIZERS,
    SENTENCEPIECE_MODEL,
    TEXT_EXTRA,
    TOKENIZER_JSON,
    TokenizerError,
    file_tokenizer,
    read_tokenizer_files,
)

from .errors import ExportError, first_line

# What the converter's check tokenizes, at most (the vocabulary's pieces, joined): enough for any vocabulary.
SAMPLE_PIECES = 20_000


@dataclass
class CarriedTokenizer:
    files: dict[str, bytes] = field(default_factory=dict)  # names to contents, a converted tokenizer.json included
    notes: list[str] = field(default_factory=list)  # for the export's summary and report


def carried_tokenizer(directory: str, vocab_size: int) -> CarriedTokenizer:
    """The tokenizer files of the checkpoint `directory` (model of `vocab_size` ids) that its exports carry, with
    tokenizer.json written from spiece.model where the checkpoint lacks it and it converts. ExportError, in one
    line, for a file that does not parse or does not fit the model (checked before any conversion)."""
    files = read_tokenizer_files(directory)
    if not files:
        return CarriedTokenizer()
    check_json_files(files, directory)
    unchecked = [name for name in FILE_TOKENIZERS if name in files and not check_tokenizer_file(
        name, files[name], vocab_size, directory)]
    carried, notes = "", []
    if SENTENCEPIECE_MODEL in files and TOKENIZER_JSON not in files:
        converted, why_not = converted_tokenizer_json(os.path.join(directory, SENTENCEPIECE_MODEL))
        if converted is None:
            notes.append(f"JavaScript apps need a tokenizer.json, which this export lacks: {SENTENCEPIECE_MODEL} was "
                         f"not converted ({why_not}); transformers' ReformerTokenizer.from_pretrained(checkpoint)"
                         ".save_pretrained(checkpoint) writes one")
        else:
            files[TOKENIZER_JSON] = converted
            carried = f" ({TOKENIZER_JSON} written from {SENTENCEPIECE_MODEL} by the tokenizers library)"
    if unchecked:
        carried += f"; {', '.join(unchecked)} not checked: {TEXT_EXTRA} to check them"
    return CarriedTokenizer(files, [f"carries the checkpoint's tokenizer: {', '.join(sorted(files))}{carried}"] + notes)


def check_json_files(files: dict[str, bytes], directory: str) -> None:
    for name, content in files.items():
        if name.endswith(".json"):
            try:
                json.loads(content.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise ExportError(f"cannot read {name} of {directory}: {first_line(error)}") from None


def check_tokenizer_file(name: str, content: bytes, vocab_size: int, directory: str) -> bool:
    """Whether the file was checked (its library is installed); ExportError when it is bad."""
    if importlib.util.find_spec(FILE_TOKENIZERS[name].library) is None:
        return False
    try:
        file_tokenizer(name, content, vocab_size, directory)
    except TokenizerError as error:
        raise ExportError(str(error)) from None
    return True


def converted_tokenizer_json(path: str) -> tuple[bytes | None, str]:
    """(tokenizer.json, "") for the SentencePiece model at path, written by the tokenizers library's converter
    (SentencePieceUnigramTokenizer.from_spm) and set to decode and strip as sentencepiece (see
    decoding_as_sentencepiece); (None, why not) where a library is missing, the converter refuses the model (it
    converts Unigram models only), or the conversion's ids or text differ from sentencepiece's on the
    vocabulary's own text."""
    try:
        from sentencepiece import SentencePieceProcessor, sentencepiece_model_pb2
        from tokenizers import SentencePieceUnigramTokenizer
    except ImportError as error:
        return None, f"{first_line(error)}: {TEXT_EXTRA}"
    except Exception as error:  # sentencepiece's protobuf module refuses an older protobuf runtime
        return None, first_line(error)
    # The converter imports the protobuf module by this top-level name; sentencepiece ships it in its package.
    sys.modules.setdefault("sentencepiece_model_pb2", sentencepiece_model_pb2)
    try:
        converted = SentencePieceUnigramTokenizer.from_spm(path)
    except Exception as error:  # the converter raises plain Exceptions
        return None, f"the tokenizers library's converter refused it: {first_line(error)}"
    processor = SentencePieceProcessor(model_file=path)
    decoding_as_sentencepiece(converted, processor,
                              sentencepiece_model_pb2.ModelProto.FromString(processor.serialized_model_proto()))
    pieces = range(min(processor.get_piece_size(), SAMPLE_PIECES))
    sample = "".join(processor.id_to_piece(index) for index in pieces
                     if not (processor.is_control(index) or processor.is_unknown(index) or processor.is_byte(index)))
    # The word-start mark stands for a space; U+2047 is outside the vocabulary: an unknown piece.
    sample = "  " + sample.replace("\u2581", " ") + "  \u2047  "
    ids = processor.encode(sample)
    if converted.encode(sample).ids != ids or converted.decode(ids) != processor.decode(ids):
        return None, "the tokenizers library's conversion gives other ids or text than sentencepiece"
    return converted.to_str().encode("utf-8"), ""


def decoding_as_sentencepiece(converted, processor, proto) -> None:
    """What the converter leaves out, set on its tokenizer: the control pieces (padding, end of text) made
    special tokens, so that they decode to nothing; the unknown piece decoding to the model's unk_surface; the
    spaces at either end stripped, where the model removes extra whitespace (the converter collapses runs)."""
    from tokenizers import decoders, normalizers

    pieces = range(processor.get_piece_size())
    converted.add_special_tokens([processor.id_to_piece(index) for index in pieces if processor.is_control(index)])
    unknown = processor.id_to_piece(processor.unk_id())
    converted.decoder = decoders.Sequence([decoders.Replace(unknown, proto.trainer_spec.unk_surface), converted.decoder])
    if proto.normalizer_spec.remove_extra_whitespaces:
        converted.normalizer = normalizers.Sequence([converted.normalizer, normalizers.Strip()])


def write_tokenizer_files(files: dict[str, bytes], folder: str) -> None:
    for name, content in files.items():
        with open(os.path.join(folder, name), "wb") as handle:
            handle.write(content)

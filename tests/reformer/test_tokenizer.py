import pytest

from reformer import tokenizer


def test_round_trip_of_multibyte_text():
    text = "def f(x):\n    return 'héllo → 世界'\n"
    ids = tokenizer.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text


def test_ids_are_bytes_shifted_past_the_special_ids():
    assert tokenizer.encode(b"\x00A\xff") == [2, 67, 257]
    assert tokenizer.encode("A", add_eos=True) == [67, tokenizer.EOS_ID]
    assert max(tokenizer.encode(bytes(range(256)))) == tokenizer.VOCAB_SIZE - 1


def test_special_ids_decode_to_nothing():
    ids = [tokenizer.PAD_ID, *tokenizer.encode("ab"), tokenizer.EOS_ID, tokenizer.PAD_ID]
    assert tokenizer.decode_bytes(ids) == b"ab"


def test_cut_multibyte_character_decodes_to_replacement():
    ids = tokenizer.encode("é")[:1]
    assert tokenizer.decode(ids) == "\ufffd"


@pytest.mark.parametrize("bad", [-1, tokenizer.VOCAB_SIZE])
def test_out_of_range_id_is_rejected(bad):
    with pytest.raises(ValueError, match="outside the byte vocabulary"):
        tokenizer.decode([bad])


# The Tokenizer object: the byte tokenizer, or a checkpoint's tokenizer files (tests/text_checkpoint.py trains one).

def test_byte_vocabulary_gets_the_byte_tokenizer(tmp_path):
    byte_tokenizer = tokenizer.load_tokenizer(tmp_path, tokenizer.VOCAB_SIZE)
    assert isinstance(byte_tokenizer, tokenizer.ByteTokenizer)
    assert byte_tokenizer.decode([tokenizer.PAD_ID, *byte_tokenizer.encode("héllo"), tokenizer.EOS_ID]) == "héllo"
    assert tokenizer.load_tokenizer(tmp_path, 30) is None
    with pytest.raises(tokenizer.TokenizerError, match="has no tokenizer"):
        tokenizer.prompt_ids(None, "text")


def test_spiece_model_reads_through_sentencepiece(tmp_path):
    from text_checkpoint import EOS_ID, PAD_ID, VOCAB_SIZE, train_sentencepiece

    sentencepiece = pytest.importorskip("sentencepiece")
    model = train_sentencepiece()
    (tmp_path / tokenizer.SENTENCEPIECE_MODEL).write_bytes(model)
    loaded = tokenizer.load_tokenizer(tmp_path, VOCAB_SIZE)
    reference = sentencepiece.SentencePieceProcessor(model_proto=model)
    text = "The miller's daughter counted boats."
    assert isinstance(loaded, tokenizer.SentencePieceTokenizer) and loaded.encode(text) == reference.encode(text)
    assert loaded.decode([PAD_ID, *loaded.encode(text), EOS_ID]) == text
    with pytest.raises(ValueError, match=f"outside the vocabulary of spiece.model \\(0..{VOCAB_SIZE - 1}\\)"):
        loaded.decode([VOCAB_SIZE])


def test_tokenizer_json_comes_first(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from text_checkpoint import train_sentencepiece

    (tmp_path / tokenizer.SENTENCEPIECE_MODEL).write_bytes(train_sentencepiece())
    words = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "river": 1, "boat": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    words.decoder = tokenizers.decoders.WordPiece()
    (tmp_path / tokenizer.TOKENIZER_JSON).write_text(words.to_str(), encoding="utf-8")
    loaded = tokenizer.load_tokenizer(tmp_path, 64)
    assert isinstance(loaded, tokenizer.JsonTokenizer)
    assert loaded.encode("boat river sea") == [2, 1, 0] and loaded.decode([1, 2]) == "river boat"


@pytest.mark.parametrize("name, content, message", [
    ("tokenizer.json", b"{not json", "cannot read tokenizer.json of .*: .*"),
    ("spiece.model", b"not a model", "cannot read spiece.model of .*: .*"),
    ("spiece.model", None, "spiece.model of .* has 64 tokens, more than the model's vocab_size 40"),
])
def test_bad_tokenizer_files_are_one_line_errors(name, content, message, tmp_path):
    pytest.importorskip("tokenizers")
    from text_checkpoint import train_sentencepiece

    (tmp_path / name).write_bytes(content if content is not None else train_sentencepiece())
    with pytest.raises(tokenizer.TokenizerError, match=message) as error:
        tokenizer.load_tokenizer(tmp_path, 40)
    assert "\n" not in str(error.value)


def test_a_missing_library_says_what_to_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # import fails as when not installed
    (tmp_path / tokenizer.SENTENCEPIECE_MODEL).write_bytes(b"")
    message = r"needs the sentencepiece library: pip install 'reformer-export\[text\]'"
    with pytest.raises(tokenizer.TokenizerError, match=message):
        tokenizer.load_tokenizer(tmp_path, 64)


def test_tokenizer_files_round_trip_through_string_metadata():
    files = {tokenizer.TOKENIZER_JSON: b'{"a": "\xc3\xa9"}', tokenizer.SENTENCEPIECE_MODEL: bytes(range(256)),
             "tokenizer_config.json": b"{}"}
    metadata = tokenizer.tokenizer_metadata(files)
    assert sorted(metadata) == ["spiece.model.base64", "tokenizer.json", "tokenizer_config.json"]
    assert all(isinstance(value, str) for value in metadata.values())
    assert tokenizer.files_from_metadata({**metadata, "model_name": "other"}) == files


def test_text_generation_decodes_each_prompt_with_its_new_tokens_up_to_the_end_token():
    import numpy as np

    def generate(rows, max_new_tokens, **options):  # left-pads to the longest, then "generates" fixed tokens
        longest = max(len(row) for row in rows)
        new = [[byte + tokenizer.BYTE_OFFSET for byte in b"!?"] + [tokenizer.EOS_ID, tokenizer.PAD_ID]] * len(rows)
        return np.array([[tokenizer.PAD_ID] * (longest - len(row)) + row + extra[:max_new_tokens]
                         for row, extra in zip(rows, new)])

    byte_tokenizer = tokenizer.ByteTokenizer()
    assert tokenizer.text_generation(generate, byte_tokenizer, ["ab", "c"], 4, {}) == ["ab!?", "c!?"]
    assert tokenizer.text_generation(generate, byte_tokenizer, "ab", 1, {}) == "ab!"
    with_eos = {"eos_token_id": ord("?") + tokenizer.BYTE_OFFSET}
    assert tokenizer.text_generation(generate, byte_tokenizer, "ab", 4, with_eos) == "ab!"


def test_eager_generate_text_is_transformers_model_and_tokenizer(tmp_path):
    """Text in, text out of eager generation from a checkpoint with its own SentencePiece tokenizer: the text of
    transformers' greedy generation with its tokenizer, for prompts of different lengths in one batch."""
    pytest.importorskip("tokenizers")
    import reformer
    from reformer.generation import generate_text
    from text_checkpoint import NEW_TOKENS, PROMPTS, reference_text, save_checkpoint

    reference, reference_tokenizer = save_checkpoint(tmp_path)
    model = reformer.ReformerModelWithLMHead.from_pretrained(tmp_path)
    ours = tokenizer.load_tokenizer(tmp_path, model.config.vocab_size)
    expected = [reference_text(reference, reference_tokenizer, text) for text in PROMPTS]
    assert generate_text(model, ours, PROMPTS, NEW_TOKENS) == expected

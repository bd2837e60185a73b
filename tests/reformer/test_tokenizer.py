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

"""Checkpoint directories with their own tokenizer, as a user's would be: a tiny SentencePiece model trained
here with sentencepiece's trainer, saved through transformers' `ReformerTokenizer(...).save_pretrained`, beside a
tiny random transformers Reformer with that vocabulary (the reference the text tests compare with)."""

from __future__ import annotations

import io

import pytest
import torch

from generation_configs import CAUSAL_BASE

# A few lines written for these tests: enough repeated words for a vocabulary of VOCAB_SIZE pieces.
TRAINING_TEXT = """The river ran past the old mill, and the miller's daughter watched the boats go by.
Every morning she counted the boats, and every evening she counted them again.
Some boats carried grain to the town; others carried wool, salt and letters for the post office.
The miller said that the river was older than the town and would outlast it.
His daughter said that the boats were more interesting than the river, because they came back.
In winter the river froze, the boats stayed in the harbour, and the mill was quiet.
"""
VOCAB_SIZE = 64
PAD_ID, UNK_ID, EOS_ID = 0, 1, 2  # transformers' ReformerConfig: pad 0, eos 2
PROMPTS = ["The river ran", "Every morning she counted the boats, and", "salt"]
NEW_TOKENS = 12


def train_sentencepiece(model_type: str = "unigram", vocab_size: int = VOCAB_SIZE) -> bytes:
    """A SentencePiece model (the bytes of a spiece.model) trained on TRAINING_TEXT."""
    sentencepiece = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_TEXT.splitlines()), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, pad_id=PAD_ID, unk_id=UNK_ID, eos_id=EOS_ID, bos_id=-1, minloglevel=2)
    return model.getvalue()


def save_checkpoint(directory, model_type: str = "unigram", seed: int = 0):
    """A checkpoint directory with a trained SentencePiece tokenizer saved by transformers' ReformerTokenizer
    and a random causal Reformer (local attention, whose cached decoding the reference shares) of its
    vocabulary. Returns (the reference model, the reference tokenizer)."""
    transformers = pytest.importorskip("transformers")
    spiece = directory / "trained.model"
    spiece.write_bytes(train_sentencepiece(model_type))
    tokenizer = transformers.ReformerTokenizer(vocab_file=str(spiece))
    spiece.unlink()
    tokenizer.save_pretrained(directory)
    values = {**CAUSAL_BASE, "attn_layers": ["local", "local"], "vocab_size": VOCAB_SIZE, "pad_token_id": PAD_ID}
    torch.manual_seed(seed)
    reference = transformers.ReformerModelWithLMHead(transformers.ReformerConfig(**values)).eval()
    reference.save_pretrained(directory)
    return reference, tokenizer


def reference_text(reference, tokenizer, text: str) -> str:
    """The reference's greedy continuation of `text`, decoded by its own tokenizer (no end token)."""
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        output = reference.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                                    pad_token_id=PAD_ID)
    return tokenizer.decode(output[0], skip_special_tokens=True)

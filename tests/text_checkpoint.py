"""Checkpoint directories with their own tokenizer, as a user's would be: a tiny SentencePiece model trained
here with sentencepiece's trainer, as spiece.model, with what transformers' `ReformerTokenizer.from_pretrained`
of it saves (`save_pretrained`: tokenizer.json, tokenizer_config.json), beside a tiny random transformers
Reformer with that vocabulary (the reference the text tests compare with).

transformers' ReformerTokenizer (5.x) reads spiece.model as a BPE model, as Google's Crime and Punishment one is:
a Unigram model comes out with other ids than sentencepiece's, so the reference checkpoints are BPE. Even then its
tokenizer.json differs from sentencepiece on text that ends in spaces or holds characters outside the vocabulary
(an extra word-start piece; unknown pieces decode to nothing): REFERENCE_SAMPLES leave those out."""

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
REFERENCE_SAMPLES = [*TRAINING_TEXT.splitlines(), *PROMPTS, "  Salt,   wool and   letters"]
# Text to tokenize with sentencepiece and the tokenizers library: also unknown characters and spaces at the end.
SAMPLES = [*REFERENCE_SAMPLES, "Zebras   queue — 42 × ünïcödé", "  leading and trailing  "]


def train_sentencepiece(model_type: str = "unigram", vocab_size: int = VOCAB_SIZE) -> bytes:
    """A SentencePiece model (the bytes of a spiece.model) trained on TRAINING_TEXT."""
    sentencepiece = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_TEXT.splitlines()), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, pad_id=PAD_ID, unk_id=UNK_ID, eos_id=EOS_ID, bos_id=-1, minloglevel=2)
    return model.getvalue()


def save_checkpoint(directory, model_type: str = "bpe", seed: int = 0):
    """A checkpoint directory with a trained SentencePiece tokenizer (spiece.model and what transformers'
    ReformerTokenizer saves from it) and a random causal Reformer (local attention, whose cached decoding the
    reference shares) of its vocabulary. Returns (the reference model, the reference tokenizer)."""
    transformers = pytest.importorskip("transformers")
    (directory / "spiece.model").write_bytes(train_sentencepiece(model_type))
    tokenizer = transformers.ReformerTokenizer.from_pretrained(directory)
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

"""Write the JavaScript runtime's test fixture, `js/test/fixtures/tiny/`: the built-in `tiny` model exported as
`causal-lm-with-past` ONNX graphs (random weights, a few hundred KB), and `expected.json`, what Python's
`reformer.runtime.OnnxGenerator` generates from them, which `cd js && npm test` compares with. Beside them,
`unigram/tokenizer.json`: a small SentencePiece-style (Unigram) tokenizer trained here with `tokenizers`, and
in expected.json what Python's `tokenizers` makes of text with it, to check that a folder holding a
`tokenizer.json` encodes and decodes in JavaScript as in Python.

    python scripts/js_fixture.py

Run it again after a change to the exported graphs, decoder_config.json or the generation loop. The graphs come
out byte for byte the same each time; the tokenizer's training is threaded and may order pieces of equal score
differently (other ids, equally valid: expected.json records the ones its tokenizer.json gives).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from exporters import api  # noqa: E402
from exporters.formats import GRAPH_FORMATS  # noqa: E402
from reformer import tokenizer  # noqa: E402
from reformer.files import write_json  # noqa: E402
from reformer.runtime import CPU, OnnxGenerator  # noqa: E402
from reformer.sampling import DECODER_CONFIG_NAME  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "js", "test", "fixtures", "tiny")
PROMPTS = ["import ", "    def __init__(self", "é"]  # three lengths, one of them a two-byte character
MAX_NEW_TOKENS = 12
REPETITION_PENALTY = 1.3
TOKENIZER_TEXT = """An exported Reformer generates text in Python, in Node.js and in a web page.
The prefill graph reads the prompt; the step graph reads one new token and the cache.
Prompts of different lengths are prefilled apart and decoded together, each row as if alone."""
TOKENIZER_PROMPTS = ["The prompt is read", "Each row"]


def expected_generations(generator: OnnxGenerator) -> dict:
    """Greedy generations (plain, with a repetition penalty, stopping at an end token) of PROMPTS batched
    together, and each prompt's first-step logits, from Python's ONNX Runtime generator."""
    prompts = [tokenizer.encode(text) for text in PROMPTS]

    def new_tokens(**options) -> list[list[int]]:
        width = max(map(len, prompts))
        return generator.generate(prompts, MAX_NEW_TOKENS, **options)[:, width:].tolist()

    greedy = new_tokens()
    eos_token_id = greedy[0][2]  # the third token of the first row: that row stops early, the others need not
    first_logits = [generator.next_token_logits("prefill", np.array([ids]), [])[0][0] for ids in prompts]
    return {
        "prompts": PROMPTS,
        "prompt_ids": prompts,
        "max_new_tokens": MAX_NEW_TOKENS,
        "greedy": greedy,
        "first_logits": [[float(value) for value in row] for row in first_logits],
        "repetition_penalty": REPETITION_PENALTY,
        "greedy_with_repetition_penalty": new_tokens(repetition_penalty=REPETITION_PENALTY),
        "eos_token_id": eos_token_id,
        "greedy_with_eos": new_tokens(eos_token_id=eos_token_id),
        "text": [tokenizer.decode(row) for row in greedy],
    }


def unigram_tokenizer(vocab_size: int):
    """A Unigram tokenizer with SentencePiece's pre-tokenizer and decoder, trained on TOKENIZER_TEXT, with ids
    0, 1, 2 for padding, end and unknown as in the models' vocabularies."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", show_progress=False)
    tokenizer.train_from_iterator(TOKENIZER_TEXT.splitlines(), trainer)
    return tokenizer


def expected_tokenizer_generations(generator: OnnxGenerator, tokenizer) -> dict:
    """TOKENIZER_PROMPTS encoded by `tokenizers`, their greedy new tokens batched together, and those decoded."""
    prompts = [tokenizer.encode(text).ids for text in TOKENIZER_PROMPTS]
    new_tokens = generator.generate(prompts, MAX_NEW_TOKENS)[:, max(map(len, prompts)):].tolist()
    return {"prompts": TOKENIZER_PROMPTS, "prompt_ids": prompts, "greedy": new_tokens,
            "text": [tokenizer.decode(row) for row in new_tokens]}


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        folder = os.path.join(scratch, "tiny")
        result = api.run_export(api.ExportRequest("onnx", model="tiny", task=api.GENERATION_TASK, output=folder))
        if not result.passed:
            sys.exit("the export of tiny failed verification: the fixture is unchanged")
        generator = OnnxGenerator(folder, providers=[CPU], io_binding=False)
        tokenizer = unigram_tokenizer(generator.vocab_size)
        expected = expected_generations(generator)
        expected["tokenizer"] = expected_tokenizer_generations(generator, tokenizer)
        shutil.rmtree(FIXTURE, ignore_errors=True)
        os.makedirs(os.path.join(FIXTURE, "unigram"))
        for name in [DECODER_CONFIG_NAME, *GRAPH_FORMATS["onnx"].decoder_files.values()]:
            shutil.copy(os.path.join(folder, name), FIXTURE)
    tokenizer.save(os.path.join(FIXTURE, "unigram", "tokenizer.json"))
    write_json(expected, os.path.join(FIXTURE, "expected.json"))
    print(f"wrote {os.path.normpath(FIXTURE)}")


if __name__ == "__main__":
    main()

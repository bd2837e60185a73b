"""exporters.tokenizer_files: exports of a checkpoint with its own tokenizer (tests/text_checkpoint.py: a
SentencePiece model trained in the test, saved through transformers) carry the tokenizer files, and text goes in
and comes out of the Python runtime as it does of transformers' model and tokenizer: the same ids, the same greedy
text. spiece.model alone converts to a tokenizer.json of sentencepiece's ids; bad files fail in one line."""

from __future__ import annotations

import json
import os
import shutil

import onnx
import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("sentencepiece")

from exporters import api  # noqa: E402
from exporters.errors import ExportError  # noqa: E402
from exporters.tokenizer_files import carried_tokenizer  # noqa: E402
from reformer.runtime import OnnxGenerator, OnnxModel  # noqa: E402
from reformer.sampling import DECODER_CONFIG_NAME  # noqa: E402
from reformer.tokenizer import (  # noqa: E402
    SENTENCEPIECE_MODEL,
    TOKENIZER_FILES,
    TOKENIZER_JSON,
    JsonTokenizer,
    SentencePieceTokenizer,
    files_from_metadata,
)
from text_checkpoint import (  # noqa: E402
    EOS_ID,
    NEW_TOKENS,
    PAD_ID,
    PROMPTS,
    REFERENCE_SAMPLES,
    SAMPLES,
    VOCAB_SIZE,
    reference_text,
    save_checkpoint,
    train_sentencepiece,
)

MAX_LENGTH = 48  # prompts plus NEW_TOKENS fit


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(checkpoint directory, reference model, reference tokenizer, its greedy text for each prompt)."""
    directory = tmp_path_factory.mktemp("checkpoint") / "story-lm"
    directory.mkdir()
    reference, tokenizer = save_checkpoint(directory)
    return directory, reference, tokenizer, [reference_text(reference, tokenizer, text) for text in PROMPTS]


@pytest.fixture(scope="module")
def generation_export(checkpoint, tmp_path_factory):
    output = tmp_path_factory.mktemp("export") / "story-lm-generation"
    # Unverified, to keep the module short: the tests compare its text with transformers' instead.
    result = api.run_export(api.ExportRequest("onnx", model=str(checkpoint[0]), task=api.GENERATION_TASK,
                                              output=str(output), max_length=MAX_LENGTH, verify=False))
    return output, result


def test_both_tokenizers_give_transformers_ids(checkpoint):
    directory, _, tokenizer, _ = checkpoint
    assert set(os.listdir(directory)) & set(TOKENIZER_FILES) == {SENTENCEPIECE_MODEL, TOKENIZER_JSON,
                                                                  "tokenizer_config.json"}
    ours = [JsonTokenizer((directory / TOKENIZER_JSON).read_bytes()),
            SentencePieceTokenizer((directory / SENTENCEPIECE_MODEL).read_bytes())]
    for text in REFERENCE_SAMPLES:
        expected = tokenizer(text)["input_ids"]
        assert [each.encode(text) for each in ours] == [expected, expected], text
        assert [each.decode(expected) for each in ours] == [tokenizer.decode(expected, skip_special_tokens=True)] * 2


def test_unigram_spiece_model_converts_to_a_tokenizer_json_of_the_same_ids_and_text(tmp_path):
    (tmp_path / SENTENCEPIECE_MODEL).write_bytes(train_sentencepiece("unigram"))
    carried = carried_tokenizer(str(tmp_path), VOCAB_SIZE)
    assert sorted(carried.files) == [SENTENCEPIECE_MODEL, TOKENIZER_JSON]
    assert carried.notes == [f"carries the checkpoint's tokenizer: spiece.model, tokenizer.json (tokenizer.json "
                             "written from spiece.model by the tokenizers library)"]
    converted, sentencepiece = (JsonTokenizer(carried.files[TOKENIZER_JSON]),
                                SentencePieceTokenizer(carried.files[SENTENCEPIECE_MODEL]))
    for text in SAMPLES:
        ids = sentencepiece.encode(text)
        assert converted.encode(text) == ids, text
        assert converted.decode([PAD_ID, *ids, EOS_ID]) == sentencepiece.decode([PAD_ID, *ids, EOS_ID]), text


def test_bpe_spiece_model_is_carried_and_the_export_says_javascript_apps_need_a_tokenizer_json(tmp_path):
    (tmp_path / SENTENCEPIECE_MODEL).write_bytes(train_sentencepiece("bpe"))
    carried = carried_tokenizer(str(tmp_path), VOCAB_SIZE)
    assert sorted(carried.files) == [SENTENCEPIECE_MODEL]
    assert carried.notes[1].startswith("JavaScript apps need a tokenizer.json, which this export lacks: spiece.model "
                                       "was not converted (the tokenizers library's converter refused it: ")


@pytest.mark.parametrize("name, content, message", [
    ("tokenizer.json", b"{not json", "cannot read tokenizer.json of .*: Expecting property name"),
    ("tokenizer.json", b'{"model": {}}', "cannot read tokenizer.json of .*: "),
    ("spiece.model", b"not a model", "cannot read spiece.model of .*: "),
    ("tokenizer_config.json", b"\xff", "cannot read tokenizer_config.json of .*: 'utf-8' codec"),
])
def test_bad_tokenizer_files_fail_the_export_in_one_line(checkpoint, name, content, message, tmp_path):
    directory = tmp_path / "broken"
    shutil.copytree(checkpoint[0], directory)
    (directory / name).write_bytes(content)
    with pytest.raises(ExportError, match=message) as error:
        api.run_export(api.ExportRequest("onnx", model=str(directory), output=str(tmp_path / "out.onnx")))
    assert "\n" not in str(error.value) and not (tmp_path / "out.onnx").exists()


def test_generation_folder_carries_the_tokenizer_and_generates_transformers_text(checkpoint, generation_export):
    directory, _, _, expected = checkpoint
    output, result = generation_export
    carried = sorted(set(os.listdir(directory)) & set(TOKENIZER_FILES))
    assert sorted(os.listdir(output)) == sorted([DECODER_CONFIG_NAME, "prefill.onnx", "decoder_step.onnx", *carried])
    assert all((output / name).read_bytes() == (directory / name).read_bytes() for name in carried)
    assert json.loads((output / DECODER_CONFIG_NAME).read_text(encoding="utf-8"))["tokenizer_files"] == carried
    assert "carries the checkpoint's tokenizer: " + ", ".join(carried) in result.notes
    generator = OnnxGenerator(output)
    assert isinstance(generator.tokenizer, JsonTokenizer)
    assert generator.generate_text(PROMPTS, NEW_TOKENS) == expected  # prompts of different lengths in one batch
    assert generator.generate_text(PROMPTS[0], NEW_TOKENS) == expected[0]


def test_generation_through_sentencepiece_and_a_written_tokenizer_json(checkpoint, generation_export, tmp_path):
    """A checkpoint with spiece.model alone: the export writes tokenizer.json from a Unigram model (carried_tokenizer,
    which run_export calls; here into a copy of the export, the model being random either way), and generation
    through it gives the text of eager generation through sentencepiece (transformers reads no Unigram
    spiece.model right: tests/text_checkpoint.py)."""
    import reformer
    from reformer.generation import generate_text

    (tmp_path / SENTENCEPIECE_MODEL).write_bytes(train_sentencepiece("unigram"))
    carried = carried_tokenizer(str(tmp_path), VOCAB_SIZE)
    output = tmp_path / "generation"
    shutil.copytree(generation_export[0], output)
    for name, content in carried.files.items():
        (output / name).write_bytes(content)
    generator = OnnxGenerator(output)
    assert isinstance(generator.tokenizer, JsonTokenizer)
    sentencepiece = SentencePieceTokenizer(carried.files[SENTENCEPIECE_MODEL])
    model = reformer.ReformerModelWithLMHead.from_pretrained(checkpoint[0])
    assert generator.generate_text(PROMPTS, NEW_TOKENS) == generate_text(model, sentencepiece, PROMPTS, NEW_TOKENS)


def test_single_graph_carries_the_tokenizer_in_its_metadata_and_takes_text(tmp_path):
    """From a checkpoint with a Unigram spiece.model alone: the graph also carries the tokenizer.json written
    from it."""
    directory = tmp_path / "unigram-lm"
    directory.mkdir()
    save_checkpoint(directory, "unigram")
    for name in (TOKENIZER_JSON, "tokenizer_config.json"):  # transformers' BPE reading of the Unigram model
        (directory / name).unlink()
    path = tmp_path / "unigram-lm.onnx"
    result = api.run_export(api.ExportRequest("onnx", model=str(directory), output=str(path), max_length=MAX_LENGTH,
                                              verify=False))
    assert result.notes == ["carries the checkpoint's tokenizer: spiece.model, tokenizer.json (tokenizer.json written "
                            "from spiece.model by the tokenizers library)"]
    metadata = {entry.key: entry.value for entry in onnx.load(path, load_external_data=False).metadata_props}
    assert {TOKENIZER_JSON, "spiece.model.base64"} <= set(metadata)
    assert files_from_metadata(metadata)[SENTENCEPIECE_MODEL] == (directory / SENTENCEPIECE_MODEL).read_bytes()
    model = OnnxModel(path)
    assert isinstance(model.tokenizer, JsonTokenizer)
    sentencepiece = SentencePieceTokenizer((directory / SENTENCEPIECE_MODEL).read_bytes())
    logits_of_text = model(PROMPTS)["logits"]
    assert (logits_of_text == model([sentencepiece.encode(text) for text in PROMPTS])["logits"]).all()


def test_triton_generation_repository_carries_the_tokenizer(generation_export, tmp_path):
    """The layout step over the staged generation export, as run_export's triton format runs it."""
    pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="needs tritonclient (the serve or test extra)")
    from exporters.triton.layout import publish_repository, staged_graph_path

    staging = tmp_path / "staging"
    staging.mkdir()
    graphs = staged_graph_path(str(staging), "python", generation=True)
    shutil.copytree(generation_export[0], graphs)
    repository = tmp_path / "repo"
    publish_repository(str(staging), graphs, str(repository), "python", "cpu", generation=True)
    served = repository / "story-lm-causal-lm-with-past" / "1" / "graphs"
    for name in json.loads((served / DECODER_CONFIG_NAME).read_text(encoding="utf-8"))["tokenizer_files"]:
        assert (served / name).read_bytes() == (generation_export[0] / name).read_bytes()
    assert OnnxGenerator(served).generate_text(PROMPTS[0], NEW_TOKENS) == OnnxGenerator(
        generation_export[0]).generate_text(PROMPTS[0], NEW_TOKENS)

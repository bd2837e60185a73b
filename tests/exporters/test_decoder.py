"""Export of the prefill and decoder-step graphs (task causal-lm-with-past), verified by the same verifier,
report and pass/fail protocol as the task graphs (exporters.decoder_verification.verify_decoder).

Tolerance: the first-order rounding bound of eager `IncrementalDecoder`'s computation, element by element
(tests/rounding.py; the graphs run the same ops), at batch sizes and lengths other than the traced ones, and on
caches of prompts of different lengths. Where a graph runs on its own cache, the bound covers the whole run
from the prompt, so a cache's rounding carried into later steps is in it."""

import json
import os

import onnx
import pytest
import torch

from exporters.decoder import export_causal_lm_with_past
from exporters.decoder_graphs import decoder_specs, example_prompt_length
from exporters.decoder_verification import load_graphs
from exporters.formats import GRAPH_FORMATS
from exporters.program import dynamic_shapes
from reformer.sampling import DECODER_CONFIG_NAME
from exporters.decoder_verification import decoder_mismatch
from exporters.errors import ExportError, VerificationError
from exporters.verification_failures import CountFailure, ShapesFailure, ValuesFailure
from exporters.verification_report import VerificationReport, VerificationRow
from generation_configs import CAUSAL_CONFIGS, left_padded_prefill, mixed_prompts, prompt, random_model
from reformer.generation import DecoderCache, IncrementalDecoder, cache_names, generate
from reformer.runtime import OnnxGenerator
from rounding import assert_within, rounding_bound

MAX_LENGTH = 48  # of the ONNX export, below the configs' 128 positions


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory):
    model = random_model(CAUSAL_CONFIGS["lsh"])
    directory = tmp_path_factory.mktemp("onnx") / "decoder"
    description, report = export_causal_lm_with_past(model, str(directory), "onnx", opset=20, max_length=MAX_LENGTH)
    return model, directory, description, report


def test_onnx_export_layout_and_verification(onnx_export):
    model, directory, description, report = onnx_export
    assert sorted(os.listdir(directory)) == sorted([DECODER_CONFIG_NAME, *GRAPH_FORMATS["onnx"].decoder_files.values()])
    with open(directory / DECODER_CONFIG_NAME, encoding="utf-8") as handle:
        assert json.load(handle) == description
    assert report.passed and len(report.rows) == 2, report.summary_table()
    for row in report.rows:
        assert row.replayed and row.replay_max_abs <= row.tolerance and row.total_buckets > 0
    assert description["opset"] == 20 and description["lowerings"]["sort_by_bucket"] == "ort"
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(directory).st_mode & 0o777 == 0o777 & ~umask
    assert description["cache"] == cache_names(model.config) == [
        "states_0", "states_1", "buckets_0", "buckets_1", "lsh_unchunked_until", "left_padding"]
    padding_values = {name: tensor["padding_value"] for name, tensor in description["cache_tensors"].items()}
    assert padding_values == {"states_0": 0.0, "states_1": 0.0, "buckets_0": 4, "buckets_1": 4,
                              "lsh_unchunked_until": None, "left_padding": None}
    assert description["max_length"] == MAX_LENGTH and description["max_position_embeddings"] == 128
    assert not [name for name in os.listdir(directory.parent) if name != "decoder"]  # no staging folder left
    for kind in ("prefill", "step"):
        proto = onnx.load(directory / GRAPH_FORMATS["onnx"].decoder_files[kind])
        assert {opset.domain: opset.version for opset in proto.opset_import}[""] == 20  # the requested opset
        graph = proto.graph
        assert [value.name for value in graph.input] == description[kind]["inputs"]
        assert [value.name for value in graph.output] == description[kind]["outputs"]
        # Static shapes: the window is found with argmax and gather, never with data-dependent ops.
        assert not {node.op_type for node in graph.node} & {"NonZero", "Loop", "If"}


def test_onnx_step_matches_eager_step(onnx_export):
    import onnxruntime

    model, directory, description, _ = onnx_export
    step_path = directory / GRAPH_FORMATS["onnx"].decoder_files["step"]
    session = onnxruntime.InferenceSession(str(step_path), providers=["CPUExecutionProvider"])
    decoder = IncrementalDecoder(model)
    with torch.no_grad():
        _, cache = decoder.prefill(prompt(4, 21, seed=1))  # past length 21: window mode, several chunks
        expected, expected_cache = decoder.step(prompt(4, 1, seed=2), cache)
    feeds = dict(zip(description["step"]["inputs"], [t.numpy() for t in (prompt(4, 1, seed=2), *cache.tensors())]))
    logits, *present = session.run(None, feeds)
    assert_within(logits, expected, rounding_bound(lambda: decoder.step(prompt(4, 1, seed=2), cache)[0]), "logits")
    for actual, wanted in zip(present, expected_cache.tensors()):
        assert actual.shape == tuple(wanted.shape)
        if wanted.dtype == torch.int64:
            assert (actual == wanted.numpy()).all()


def test_onnx_step_on_left_padded_cache_matches_eager(onnx_export):
    """Prompts of different lengths: steps on their joined, left-padded cache (logits and present cache)."""
    import onnxruntime

    model, directory, description, _ = onnx_export
    step_path = directory / GRAPH_FORMATS["onnx"].decoder_files["step"]
    session = onnxruntime.InferenceSession(str(step_path), providers=["CPUExecutionProvider"])
    decoder = IncrementalDecoder(model)
    _, cache = left_padded_prefill(model, mixed_prompts())
    past = [tensor.numpy() for tensor in cache.tensors()]
    for position in range(12):
        tokens = prompt(len(past[0]), 1, seed=position)
        bound = rounding_bound(lambda: decoder.step(tokens, cache)[0])
        with torch.no_grad():
            expected, cache = decoder.step(tokens, cache)
        logits, *past = session.run(None, dict(zip(description["step"]["inputs"], [tokens.numpy(), *past])))
        assert_within(logits, expected, bound, f"step {position}")
        for actual, wanted in zip(past, cache.tensors()):
            if wanted.dtype == torch.int64:
                assert (actual == wanted.numpy()).all()
        past = [tensor.numpy() for tensor in cache.tensors()]  # eager's cache: no compounding


def test_onnx_generation_serves_max_length_and_refuses_more(onnx_export):
    model, directory, _, _ = onnx_export
    generator = OnnxGenerator(directory, providers=["CPUExecutionProvider"])
    input_ids = prompt(2, 9, seed=8)
    new_tokens = MAX_LENGTH - 9 + 1  # the last new token is predicted from position MAX_LENGTH - 1
    expected = generate(model, input_ids, new_tokens).numpy()
    assert (generator.generate(input_ids.numpy(), new_tokens) == expected).all()
    with pytest.raises(ValueError, match=f"needs {MAX_LENGTH + 1} positions; the export's max_length is {MAX_LENGTH}"):
        generator.generate(input_ids.numpy(), new_tokens + 1)


def test_torchscript_decoder_runs_prefill_and_step(tmp_path):
    model = random_model(CAUSAL_CONFIGS["mixed"])
    directory = tmp_path / "decoder"
    description, report = export_causal_lm_with_past(model, str(directory), "torchscript")
    assert report.passed, report.summary_table()
    assert sorted(os.listdir(directory)) == sorted([DECODER_CONFIG_NAME,
                                                    GRAPH_FORMATS["torchscript"].decoder_files["module"]])
    extra = {DECODER_CONFIG_NAME: ""}
    torch.jit.load(str(directory / GRAPH_FORMATS["torchscript"].decoder_files["module"]), _extra_files=extra)
    assert json.loads(extra[DECODER_CONFIG_NAME])["cache"] == description["cache"]
    assert_graphs_match_eager(model, load_graphs(str(directory), "torchscript"), description)


# Slow: two AOTInductor compiles (prefill and step), 1 to 3 minutes on 2 cores.
@pytest.mark.slow
def test_aoti_decoder_package_runs_prefill_and_step(tmp_path):
    from exporters.aoti import package_metadata

    model = random_model(CAUSAL_CONFIGS["mixed"])
    directory = tmp_path / "decoder"
    description, report = export_causal_lm_with_past(model, str(directory), "aoti")
    assert report.passed and {row.runtime for row in report.rows} == {"aoti"}, report.summary_table()
    assert sorted(os.listdir(directory)) == sorted([DECODER_CONFIG_NAME,
                                                    GRAPH_FORMATS["aoti"].decoder_files["package"]])
    assert description["cpu_march"] == "x86-64-v3"
    for kind in ("prefill", "step"):  # what a C++ host reads with AOTIModelPackageLoader(path, kind).get_metadata()
        metadata = package_metadata(str(directory / GRAPH_FORMATS["aoti"].decoder_files["package"]), kind)
        assert json.loads(metadata[DECODER_CONFIG_NAME]) == description and "AVX512" not in metadata["AOTI_CPU_ISA"]
    assert_graphs_match_eager(model, load_graphs(str(directory), "aoti"), description)


def assert_graphs_match_eager(model, run, description) -> None:
    """Prefill and 12 greedy steps at a batch and length other than the exported (2, 13), then 12 steps on the
    joined, left-padded cache of prompts of different lengths, each graph on its own cache: logits within the
    rounding bound of eager's run."""
    decoder = IncrementalDecoder(model)
    input_ids = prompt(3, 5, seed=3)
    with torch.no_grad():  # eager's greedy run: its tokens drive every run below
        logits, cache = decoder.prefill(input_ids)
        expected, greedy = [logits], []
        for _ in range(12):
            greedy.append(logits[:, -1:].argmax(-1))
            logits, cache = decoder.step(greedy[-1], cache)
            expected.append(logits)

    def eager_greedy_run():
        logits, cache = decoder.prefill(input_ids)
        runs = [logits]
        for token in greedy:
            logits, cache = decoder.step(token, cache)
            runs.append(logits)
        return runs

    bounds = rounding_bound(eager_greedy_run)
    with torch.no_grad():
        logits, past = run("prefill", input_ids, [])
        actual = [logits]
        for token in greedy:
            logits, past = run("step", token, past)
            actual.append(logits)
        assert len(past) == len(description["cache"]) and past[0].shape[1] == 5 + 12
    _, joined = left_padded_prefill(model, mixed_prompts())  # prompts of different lengths
    tokens = [prompt(len(joined.left_padding), 1, seed=position) for position in range(12)]

    def eager_steps():
        cache, runs = joined, []
        for token in tokens:
            logits, cache = decoder.step(token, cache)
            runs.append(logits)
        return runs

    bounds += rounding_bound(eager_steps)
    with torch.no_grad():
        expected += eager_steps()
        past = list(joined.tensors())
        for token in tokens:
            logits, past = run("step", token, past)
            actual.append(logits)
    for index, (got, want, bound) in enumerate(zip(actual, expected, bounds, strict=True)):
        assert_within(got, want, bound, f"run {index}")


def far_off(model, folder, fmt, atol):
    row = VerificationRow("torchscript", "cpu", (1, 1), "fp32", tolerance=1e-5, replay_max_abs=0.5)
    row.conclude([ValuesFailure(0.5, 1e-5)])
    return VerificationReport(fmt, folder, rows=[row])


def test_failed_verification_leaves_nothing_or_keeps_on_request(tmp_path, monkeypatch):
    monkeypatch.setattr("exporters.decoder.verify_decoder", far_off)
    with pytest.raises(VerificationError, match="0.5 > tolerance 1e-05"):
        export_causal_lm_with_past(random_model(CAUSAL_CONFIGS["local"]), str(tmp_path / "out"), "torchscript")
    assert os.listdir(tmp_path) == []
    _, report = export_causal_lm_with_past(random_model(CAUSAL_CONFIGS["local"]), str(tmp_path / "kept"),
                                           "torchscript", keep_failed=True)
    assert not report.passed and os.listdir(tmp_path) == ["kept"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_callers_model_keeps_its_dtype_device_and_training_mode(dtype, tmp_path):
    """The export works on the model in fp32 eval mode on the CPU (a copy where it needs one): the caller's
    model is as it was, down to a submodule's own mode."""
    model = random_model(CAUSAL_CONFIGS["local"]).to(dtype).train()
    model.lm_head.eval()
    export_causal_lm_with_past(model, str(tmp_path / "out"), "torchscript", verify=False)
    parameter = next(model.parameters())
    assert parameter.dtype == dtype and parameter.device.type == "cpu"
    assert model.training and model.reformer.training and not model.lm_head.training


def test_the_report_counts_the_steps_run(tmp_path):
    """A prompt near max_length leaves room for fewer greedy steps than asked: its row says how many ran."""
    model, max_length = random_model(CAUSAL_CONFIGS["local"]), 12
    _, report = export_causal_lm_with_past(model, str(tmp_path / "out"), "torchscript", max_length=max_length)
    asked = model.config.lsh_attn_chunk_length + 3
    ran = [min(asked, max_length - length) for _, length in (row.shape for row in report.rows)]
    assert [row.note for row in report.rows] == [f"prefill and {steps} greedy steps" for steps in ran]
    assert report.passed and min(ran) < asked


def test_a_cache_of_other_tensors_fails_by_kind():
    logits, cache = torch.zeros(1, 2, 5), [torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)]
    short = decoder_mismatch(logits, cache[:1], logits, cache, ["states_0", "states_1"])
    assert short == CountFailure(1, 2, "cache tensors", "eager") and short.kind == "names"
    assert short.message() == "the graph returns 1 cache tensors, eager 2"
    wrong = decoder_mismatch(logits, [cache[0], torch.zeros(1, 3, 4)], logits, cache, ["states_0", "states_1"])
    assert wrong == ShapesFailure("states_1", (1, 3, 4), (1, 2, 4))


@pytest.mark.parametrize("problem, message", [
    ("exists", "already exists"),
    ("not causal", "needs a causal LM"),
    ("format", "unknown format 'tflite'"),
    ("max_length 1", "max_length"),
    ("max_length 129", "max_length"),
])
def test_bad_requests_are_refused(problem, message, tmp_path):
    model, output, fmt = random_model(CAUSAL_CONFIGS["local"]), tmp_path / "out", "onnx"
    max_length = int(problem.split()[1]) if problem.startswith("max_length") else None
    if problem == "exists":
        output.mkdir()
    elif problem == "not causal":
        import reformer

        values = {**CAUSAL_CONFIGS["local"], "is_decoder": False}
        model = reformer.ReformerForMaskedLM(reformer.ReformerConfig(**values))
    elif problem == "format":
        fmt = "tflite"
    with pytest.raises(ExportError, match=message):
        export_causal_lm_with_past(model, str(output), fmt, max_length=max_length)
    assert os.listdir(tmp_path) == (["out"] if problem == "exists" else [])


def test_cache_round_trips_through_tensors():
    model = random_model(CAUSAL_CONFIGS["mixed"])
    with torch.no_grad():
        _, cache = IncrementalDecoder(model).prefill(prompt(2, 6))
    again = DecoderCache.from_tensors(model.config, cache.tensors())
    assert all(a is b for a, b in zip(again.tensors(), cache.tensors()))
    assert len(cache.tensors()) == len(cache_names(model.config))


def test_graph_specs_follow_the_cache_layout():
    """The prefill's and the step's names, axes and examples come from the cache layout, and so do the dims
    torch.export gets: the step's past cache as the one tuple StepGraph's `*past` takes."""
    model = random_model(CAUSAL_CONFIGS["mixed"])
    specs = decoder_specs(IncrementalDecoder(model), MAX_LENGTH)
    names = cache_names(model.config)
    present = tuple(f"present_{name}" for name in names)
    assert specs["prefill"].input_names == ("input_ids",) and specs["prefill"].output_names == ("logits", *present)
    assert specs["step"].input_names == ("input_ids", *(f"past_{name}" for name in names))
    assert specs["step"].output_names == ("logits", *present)
    assert specs["prefill"].dynamic_axes["present_buckets_1"] == {0: "batch_size", 3: "prompt_length"}
    assert specs["step"].dynamic_axes["past_states_0"] == {0: "batch_size", 1: "past_length"}
    assert specs["step"].dynamic_axes["present_states_0"] == {0: "batch_size"}
    prompt_length = example_prompt_length(model.config, MAX_LENGTH)
    assert specs["prefill"].example_inputs[0].shape == (2, prompt_length)
    step_inputs = specs["step"].example_inputs
    assert step_inputs[0].shape == (2, 1) and len(step_inputs) == 1 + len(names)
    assert step_inputs[1].shape == (2, prompt_length, model.config.hidden_size)
    shapes = dynamic_shapes(specs["step"])
    assert list(shapes) == ["input_ids", "past"] and len(shapes["past"]) == len(names)
    assert shapes["past"][0][1].__name__ == "past_length" and shapes["past"][0][1].max == MAX_LENGTH - 1
    assert dynamic_shapes(specs["prefill"])["input_ids"][1].max == MAX_LENGTH


def test_export_api_task(tmp_path):
    """`reformer-export --task causal-lm-with-past` goes through exporters.api.run_export."""
    from exporters.api import ExportRequest, ExportRequestError, run_export

    output = tmp_path / "tiny-decoder"
    result = run_export(ExportRequest(format="torchscript", model="tiny", task="causal-lm-with-past", output=str(output)))
    assert result.passed and result.task == "causal-lm-with-past" and result.output == str(output)
    assert isinstance(result.verification, VerificationReport) and result.verification.passed
    assert all(row.replay_max_abs <= row.tolerance for row in result.verification.rows)
    with open(output / DECODER_CONFIG_NAME, encoding="utf-8") as handle:
        assert json.load(handle)["model_name"] == "tiny"
    with pytest.raises(ExportRequestError, match="fp32"):
        run_export(ExportRequest(format="onnx", task="causal-lm-with-past", dtype="fp16", output=str(tmp_path / "x")))


def test_export_api_keeps_failed_decoder_graphs_only_on_request(tmp_path, monkeypatch):
    """--keep-failed works for causal-lm-with-past as for the task graphs: the result says it failed, and the
    directory is there only when asked for."""
    from exporters.api import ExportRequest, run_export

    monkeypatch.setattr("exporters.decoder.verify_decoder", far_off)
    for keep_failed, name in ((False, "removed"), (True, "kept")):
        output = tmp_path / name
        result = run_export(ExportRequest(format="torchscript", model="tiny", task="causal-lm-with-past",
                                          output=str(output), keep_failed=keep_failed))
        assert not result.passed and "0.5 > tolerance" in result.verification.failure_message()
        assert output.exists() == keep_failed and result.output == (str(output) if keep_failed else None)
    assert sorted(os.listdir(tmp_path)) == ["kept"]  # no staging folder left behind

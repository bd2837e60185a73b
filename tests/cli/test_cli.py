"""`reformer-export` through click's CliRunner: every bad input gives one `Error:` line, a non-zero exit, no
traceback and nothing at the output path; the default model exports and verifies."""

from __future__ import annotations

import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from click.testing import CliRunner

import reformer
from cli import main as cli_main
from exporters import api
from reformer.files import STAGING_PREFIX
from tiny_configs import BASE

OUTPUT = "out.onnx"
REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MARKER = "pickle-ran"


class CodeRunningPickle:
    """Unpickling this creates the file MARKER: what a malicious pytorch_model.bin would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def save_checkpoint(directory: str, **overrides) -> str:
    torch.manual_seed(0)
    config = reformer.ReformerConfig(**{**BASE, "attn_layers": ["local", "lsh"], "is_decoder": True, **overrides})
    reformer.ReformerModelWithLMHead(config).save_pretrained(directory)
    return directory


def missing_dir(root: str) -> list[str]:
    return ["--model", os.path.join(root, "no-such-model")]


def malformed_config(root: str) -> list[str]:
    directory = save_checkpoint(os.path.join(root, "ckpt"))
    with open(os.path.join(directory, "config.json"), "w") as handle:
        handle.write('{"hidden_size": 16,')
    return ["--model", directory]


def wrong_model_type(root: str) -> list[str]:
    directory = save_checkpoint(os.path.join(root, "ckpt"))
    with open(os.path.join(directory, "config.json"), "w") as handle:
        json.dump({"model_type": "bert", "hidden_size": 16}, handle)
    return ["--model", directory]


def config_without_weights(root: str) -> list[str]:
    directory = save_checkpoint(os.path.join(root, "ckpt"))
    os.remove(os.path.join(directory, "model.safetensors"))
    return ["--model", directory]


def mis_shaped_weights(root: str) -> list[str]:
    directory = save_checkpoint(os.path.join(root, "ckpt"))
    config = json.load(open(os.path.join(directory, "config.json")))
    config["feed_forward_size"] = 48
    with open(os.path.join(directory, "config.json"), "w") as handle:
        json.dump(config, handle)
    return ["--model", directory]


def config_beyond_memory(root: str) -> list[str]:
    """A valid config.json asking for 10^9 hidden units (2.6e11 parameters, the word embeddings most)."""
    directory = save_checkpoint(os.path.join(root, "ckpt"))
    config = json.load(open(os.path.join(directory, "config.json")))
    config.update(hidden_size=10**9, axial_pos_embds=False)
    with open(os.path.join(directory, "config.json"), "w") as handle:
        json.dump(config, handle)
    return ["--model", directory]


def code_running_pickle(root: str) -> list[str]:
    directory = save_checkpoint(os.path.join(root, "ckpt"))
    os.remove(os.path.join(directory, "model.safetensors"))
    torch.save({"weight": CodeRunningPickle(os.path.join(root, MARKER))}, os.path.join(directory, "pytorch_model.bin"))
    return ["--model", directory]


def model_is_a_file(root: str) -> list[str]:
    path = os.path.join(root, "model.bin")
    open(path, "w").close()
    return ["--model", path]


def output_under_a_file(root: str) -> list[str]:
    blocker = os.path.join(root, "somefile")
    open(blocker, "w").close()
    return ["--output", os.path.join(blocker, OUTPUT)]


def output_in_missing_dir(root: str) -> list[str]:
    return ["--output", os.path.join(root, "missing", OUTPUT)]


def output_is_a_dir(root: str) -> list[str]:
    os.mkdir(os.path.join(root, "taken"))
    return ["--output", os.path.join(root, "taken")]


def symlinked(option: str, name: str) -> Callable[[str], list[str]]:
    """The path given links to one that does not exist yet: writing through the link would create it."""
    def arguments(root: str) -> list[str]:
        os.symlink(os.path.join(root, "elsewhere"), os.path.join(root, name))
        return [option, os.path.join(root, name)]
    return arguments


def report_in_missing_dir(root: str) -> list[str]:
    return ["--report", os.path.join(root, "missing", "report.json")]


@dataclass
class BadInput:
    name: str
    arguments: Callable[[str], list[str]]  # extra arguments, given a scratch folder
    message: str  # part of the one error line
    exit_code: int = 1  # 2: rejected by click's option parsing
    format: str = "onnx"


BAD_INPUTS = [
    BadInput("missing_model_dir", missing_dir, "no model directory"),
    BadInput("malformed_config", malformed_config, "is not valid JSON"),
    BadInput("not_a_reformer_config", wrong_model_type, "describes a 'bert' model"),
    BadInput("config_without_weights", config_without_weights, "no weights in"),
    BadInput("mis_shaped_weights", mis_shaped_weights, "mis-shaped weight(s)"),
    BadInput("code_running_pickle", code_running_pickle, "holds more than tensors and was not loaded"),
    BadInput("config_beyond_memory", config_beyond_memory,
             "config.json describes a model of 260,000,000,064 parameters, whose fp32 weights need 968.6 GiB"),
    BadInput("model_is_a_file", model_is_a_file, "is a file"),
    BadInput("unknown_task", lambda root: ["--task", "translation"], "Invalid value for '--task'", 2),
    BadInput("task_does_not_fit_config", lambda root: ["--task", "masked-lm"], "needs a bidirectional model"),
    BadInput("unknown_format", lambda root: [], "Invalid value for '--format'", 2, format="tflite"),
    BadInput("output_under_a_file", output_under_a_file, "cannot write"),
    BadInput("output_in_missing_dir", output_in_missing_dir, "cannot write"),
    BadInput("output_is_a_dir", output_is_a_dir, "is a directory", 2),
    BadInput("report_in_missing_dir", report_in_missing_dir, "cannot write the report"),
    BadInput("output_is_a_symlink", symlinked("--output", OUTPUT), "is a symbolic link (to"),
    BadInput("report_is_a_symlink", symlinked("--report", "report.json"), "is a symbolic link (to"),
    BadInput("triton_output_is_a_symlink", symlinked("--output", "repository"), "is a symbolic link (to",
             format="triton"),
    BadInput("max_length_too_long", lambda root: ["--max-length", "100000"], "must be between 1 and"),
    BadInput("torchscript_max_length_too_long", lambda root: ["--max-length", "2000"], "must be between 1 and",
             format="torchscript"),
    BadInput("fp16_on_cpu", lambda root: ["--dtype", "fp16"], "use device cuda"),
    BadInput("opset_below_range", lambda root: ["--opset", "17"], "Invalid value for '--opset'", 2),
    BadInput("opset_above_range", lambda root: ["--opset", "24"], "Invalid value for '--opset'", 2),
    BadInput("opset_for_torchscript", lambda root: ["--opset", "18"], "--opset applies to ONNX only",
             format="torchscript"),
    BadInput("custom_ops_for_torchscript", lambda root: ["--custom-ops", "auto"], "--custom-ops applies to ONNX only",
             format="torchscript"),
    BadInput("atol_without_verify", lambda root: ["--no-verify", "--atol", "0.1"], "--atol applies to verification"),
    BadInput("keep_failed_without_verify", lambda root: ["--no-verify", "--keep-failed"],
             "--keep-failed applies to verification"),
    BadInput("generation_on_cuda", lambda root: ["--task", "causal-lm-with-past", "--device", "cuda"],
             "drop --dtype and --device"),
    BadInput("generation_max_length_too_long", lambda root: ["--task", "causal-lm-with-past", "--max-length", "5000"],
             "must be between 1 and"),
    BadInput("generation_opset_for_torchscript", lambda root: ["--task", "causal-lm-with-past", "--opset", "20"],
             "--opset applies to ONNX only", format="torchscript"),
    BadInput("torchscript_missing_model", missing_dir, "no model directory", format="torchscript"),
    BadInput("opset_for_aoti", lambda root: ["--opset", "18"], "--opset applies to ONNX only", format="aoti"),
    BadInput("custom_ops_for_aoti", lambda root: ["--custom-ops", "ort"], "--custom-ops applies to ONNX only",
             format="aoti"),
    BadInput("native_isa_for_onnx", lambda root: ["--native-isa"], "--native-isa applies to aoti only"),
    BadInput("native_isa_for_torchscript", lambda root: ["--native-isa"], "--native-isa applies to aoti only",
             format="torchscript"),
    BadInput("aoti_output_not_pt2", lambda root: ["--output", os.path.join(root, "model.pt")], "must end in .pt2",
             format="aoti"),
    BadInput("aoti_missing_model", missing_dir, "no model directory", format="aoti"),
]
if not torch.cuda.is_available():
    BAD_INPUTS.append(BadInput("cuda_without_gpu", lambda root: ["--device", "cuda"], "sees no CUDA device"))


def run_cli(arguments: list[str]):
    return CliRunner().invoke(cli_main.main, arguments)


@pytest.mark.parametrize("bad", BAD_INPUTS, ids=lambda bad: bad.name)
def test_bad_input_gives_one_error_line_and_writes_nothing(bad, tmp_path, monkeypatch):
    scratch, work = tmp_path / "scratch", tmp_path / "work"
    scratch.mkdir()
    work.mkdir()
    arguments = bad.arguments(str(scratch))
    scratch_before = sorted(os.listdir(scratch))
    monkeypatch.chdir(work)
    result = run_cli(["--format", bad.format, *arguments])
    assert result.exit_code == bad.exit_code, result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1 and bad.message in error_lines[0], result.stderr
    assert os.listdir(work) == [], "something was written in the current directory"
    assert sorted(os.listdir(scratch)) == scratch_before, "something was written beside the output path"
    assert not (scratch / MARKER).exists(), "the pickle ran code"


def test_aoti_without_a_compiler_fails_before_loading_the_model(tmp_path, monkeypatch):
    def no_compiler():
        raise RuntimeError("No working C++ compiler found in cpp_builder.py")

    monkeypatch.setattr("torch._inductor.cpp_builder.get_cpp_compiler", no_compiler)
    monkeypatch.chdir(tmp_path)
    result = run_cli(["--format", "aoti"])
    assert result.exit_code == 1 and "Loading model" not in result.stderr
    assert result.stderr.splitlines() == [
        "Error: an AOTInductor package is compiled C++, and no C++ compiler was found (No working C++ compiler found "
        "in cpp_builder.py): install g++, or name one in CXX"]
    assert os.listdir(tmp_path) == []


def test_help_names_what_the_library_has():
    """The choices come from the library (exporters.choices, exporters.formats); these facts the help states
    about it are written apart: the models/ folder's models, aoti's portable instruction set."""
    from exporters import aoti, models
    from exporters.choices import BUILT_IN_MODELS

    assert sorted(BUILT_IN_MODELS) == models.built_in_models()
    native_isa = next(parameter for parameter in cli_main.main.params if parameter.name == "native_isa")
    assert aoti.PORTABLE_MARCH in native_isa.help


def test_help_names_the_built_in_models_defaults_and_opset_range():
    result = run_cli(["--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())  # click wraps lines
    assert "models/ (byte-lm, tiny, enwik8). Default: byte-lm." in text
    assert "exports the built-in byte-lm model" in text and "tiny model" not in text
    assert "ONNX opset, 18 to 23 (--format onnx only). Default: 18. [18<=x<=23]" in text


def test_every_option_has_help():
    for parameter in cli_main.main.params:
        assert getattr(parameter, "help", None), parameter.name


def test_help_does_not_import_torch():
    """--help must answer at once: the command imports torch only when it runs, and the library modules it takes
    its choices from (exporters.choices, exporters.formats) import none."""
    code = ("import sys; from click.testing import CliRunner; from cli.main import main; "
            "result = CliRunner().invoke(main, ['--help']); print(result.exit_code, 'torch' in sys.modules)")
    completed = subprocess.run([sys.executable, "-c", code], cwd=REPOSITORY, capture_output=True, text=True, check=True)
    assert completed.stdout.split() == ["0", "False"]


def load_report(path) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


# aoti: two compiles (the package and its twin), 1.5 to 4 minutes on 2 cores, so with the slow tests; the
# default run exports AOTInductor packages through the CLI on a tiny model
# (test_aoti_package_exports_verifies_and_reports_its_compile_time).
@pytest.mark.parametrize("format_,suffix", [("onnx", ".onnx"), pytest.param("aoti", ".pt2", marks=pytest.mark.slow),
                                            ("torchscript", ".pt")])
def test_default_model_exports_verifies_and_reports(format_, suffix, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_cli(["--format", format_, "--report", "report.json"])
    assert result.exit_code == 0, result.output
    from exporters.models import DEFAULT_MODEL

    output = f"{DEFAULT_MODEL}-causal-lm{suffix}"
    assert sorted(os.listdir(tmp_path)) == sorted([output, "report.json"])
    report = load_report(tmp_path / "report.json")
    assert report["passed"] and report["verified"] and report["output"] == output
    assert report["verification"]["path"] == output  # not the staging folder it was verified in
    assert STAGING_PREFIX not in (tmp_path / "report.json").read_text()
    assert report["size_bytes"] == os.path.getsize(tmp_path / output)
    format_settings = {"onnx": {"opset": 18, "custom_ops": "auto"}, "aoti": {"cpu_march": "x86-64-v3"}}
    assert report["settings"] == {"format": format_, "dtype": "fp32", "device": "cpu", "max_length": 1024,
                                  **format_settings.get(format_, {})}
    assert_versions_recorded(report["versions"])
    assert "passed" in result.stdout and output in result.stdout
    export_line = {"onnx": "onnx, fp32, cpu, max length 1024, opset 18, custom ops auto",
                   "aoti": "aoti, fp32, cpu, max length 1024, CPU target x86-64-v3",
                   "torchscript": "torchscript, fp32, cpu, max length 1024"}[format_]
    assert f"export        {export_line}\n" in result.stdout


def assert_versions_recorded(versions: dict) -> None:
    import onnx
    import onnxruntime
    import onnxscript

    assert versions["python"] == platform.python_version()
    assert versions["torch"] == torch.__version__
    assert (versions["onnx"], versions["onnxscript"]) == (onnx.__version__, onnxscript.__version__)
    # ONNX Runtime is one of two packages, both providing the onnxruntime module.
    assert onnxruntime.__version__ in (versions["onnxruntime"], versions["onnxruntime-gpu"])


def test_exported_torchscript_matches_eager_of_the_named_model(tmp_path, monkeypatch):
    """Through the CLI without the verifier: the file holds the built-in model's numbers."""
    from exporters.models import DEFAULT_MODEL, resolve_model

    monkeypatch.chdir(tmp_path)
    result = run_cli(["--format", "torchscript", "--no-verify", "--output", "lm.pt", "--max-length", "64"])
    assert result.exit_code == 0, result.output
    resolved = resolve_model(DEFAULT_MODEL)
    input_ids = torch.randint(0, resolved.model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    with torch.no_grad():
        expected = resolved.model(input_ids=input_ids, attention_mask=attention_mask).logits
        actual = torch.jit.load(str(tmp_path / "lm.pt"))(input_ids, attention_mask)[0]
    # Bitwise: the traced graph calls eager's own ATen kernels on the same shapes in this process (torch aligns
    # every buffer to 64 bytes, so MKL takes the same paths), and rounds exactly as eager does.
    assert torch.equal(expected, actual), f"max abs diff {(expected - actual).abs().max().item():.3g}"


def test_aoti_package_exports_verifies_and_reports_its_compile_time(tmp_path, monkeypatch):
    """--format aoti end to end on a tiny checkpoint with local attention only (one compile: no LSH layer, so no
    verification twin; tests/exporters/test_aoti.py covers the twin)."""
    from exporters.aoti import load_metadata, package_metadata

    directory = save_checkpoint(str(tmp_path / "tiny-local"), attn_layers=["local", "local"])
    monkeypatch.chdir(tmp_path)
    result = run_cli(["--model", directory, "--format", "aoti", "--max-length", "16", "--report", "report.json"])
    assert result.exit_code == 0, result.output
    output = "tiny-local-causal-lm.pt2"
    assert sorted(os.listdir(tmp_path)) == sorted(["tiny-local", output, "report.json"])
    report = load_report(tmp_path / "report.json")
    assert report["passed"] and report["output"] == output
    assert report["settings"] == {"format": "aoti", "dtype": "fp32", "device": "cpu", "max_length": 16,
                                  "cpu_march": "x86-64-v3"}
    assert set(report["seconds"]) == {"load", "export", "compile", "verify"}
    assert report["seconds"]["compile"] > report["seconds"]["export"]
    shapes = [tuple(row["shape"]) for row in report["verification"]["rows"]]
    assert (1, 1) in shapes and (2, 16) in shapes and {row["runtime"] for row in report["verification"]["rows"]} == {
        "aoti"}
    assert "export        aoti, fp32, cpu, max length 16, CPU target x86-64-v3\n" in result.stdout
    assert re.search(r"time +load [0-9.]+ s, export [0-9.]+ s, compile [0-9.]+ s, verify", result.stdout)
    assert load_metadata(tmp_path / output)["model_name"] == "tiny-local"
    assert "AVX512" not in package_metadata(tmp_path / output)["AOTI_CPU_ISA"]


def test_checkpoint_directory_exports_under_its_own_name(tmp_path, monkeypatch):
    directory = save_checkpoint(str(tmp_path / "my-reformer"))
    monkeypatch.chdir(tmp_path)
    result = run_cli(["--model", directory, "--format", "torchscript", "--no-verify"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "my-reformer-causal-lm.pt").is_file()


class FailingReport:
    passed = False

    def to_dict(self) -> dict:
        return {"passed": False, "rows": []}

    def summary_table(self) -> str:
        return "runtime      max abs  result\ntorchscript  1.0e+00  FAIL"

    def failure_message(self) -> str:
        return "torchscript cpu 1x1: max abs 1.0e+00 > 1e-05"


@pytest.mark.parametrize("keep_failed", [False, True])
def test_failed_verification_exits_non_zero(keep_failed, tmp_path, monkeypatch):
    import exporters.verify

    monkeypatch.setattr(exporters.verify, "verify_export", lambda *arguments, **options: FailingReport())
    monkeypatch.chdir(tmp_path)
    result = run_cli(["--format", "torchscript", "--output", "lm.pt", "--report", "report.json"]
                     + (["--keep-failed"] if keep_failed else []))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "Error: verification failed: torchscript cpu 1x1: max abs 1.0e+00" in result.stderr
    assert "FAIL" in result.stdout
    assert (tmp_path / "lm.pt").exists() == keep_failed
    assert load_report(tmp_path / "report.json")["passed"] is False


def test_transformers_checkpoint_exports_through_the_cli_and_matches_the_reference(tmp_path, monkeypatch):
    """Acceptance 2: a directory written by transformers' save_pretrained, exported to ONNX by the CLI, against
    the reference's eager output with the same hash_seed, within the first-order rounding bound of our model's
    computation (the graph and the reference each evaluate the same math within half of it; tests/rounding.py)."""
    import onnxruntime

    from reference import reference_and_ours
    from rounding import assert_within, rounding_bound
    from tiny_configs import CASES_BY_NAME, make_inputs

    case = CASES_BY_NAME["lm_mixed"]
    reference, ours = reference_and_ours(case, tmp_path / "checkpoint")
    monkeypatch.chdir(tmp_path)
    result = run_cli(["--model", str(tmp_path / "checkpoint"), "--format", "onnx", "--output", "lm.onnx"])
    assert result.exit_code == 0, result.output
    session = onnxruntime.InferenceSession(str(tmp_path / "lm.onnx"), providers=["CPUExecutionProvider"])
    input_ids, attention_mask = make_inputs(2, case.length)
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=attention_mask).logits
    actual = session.run(["logits"], {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()})[0]
    bound = rounding_bound(lambda: ours(input_ids=input_ids, attention_mask=attention_mask).logits)
    assert_within(actual, expected, bound, "logits", attention_mask.bool())


def test_hub_id_exports_under_its_model_name(tmp_path, monkeypatch, hub_cache):
    hub_cache("someone/my-reformer", save_checkpoint(str(tmp_path / "ckpt")))
    monkeypatch.chdir(tmp_path)
    result = run_cli(["--model", "someone/my-reformer", "--format", "torchscript", "--no-verify"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "my-reformer-causal-lm.pt").is_file()
    assert "my-reformer (Hugging Face Hub someone/my-reformer@" in result.stdout


def test_hub_id_missing_from_the_offline_cache_gives_one_error_line(tmp_path, monkeypatch, hub_cache):
    monkeypatch.chdir(tmp_path)
    result = run_cli(["--model", "google/reformer-enwik8", "--format", "onnx"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1, result.stderr
    assert "Hugging Face Hub model google/reformer-enwik8 could not be fetched" in error_lines[0]
    assert os.listdir(tmp_path) == ["hub-cache"]
def onnx_opset(proto) -> int:
    return {opset.domain: opset.version for opset in proto.opset_import}[""]


def test_onnx_options_reach_the_graph_and_the_summary(tmp_path, monkeypatch):
    import onnx

    from exporters.onnx import METADATA_PREFIX

    monkeypatch.chdir(tmp_path)
    result = run_cli(["--model", "tiny", "--format", "onnx", "--opset", "20", "--custom-ops", "standard",
                      "--max-length", "64", "--no-verify", "--output", "lm.onnx"])
    assert result.exit_code == 0, result.output
    proto = onnx.load("lm.onnx")
    assert onnx_opset(proto) == 20
    assert all(node.domain == "" for node in proto.graph.node) and not proto.functions  # standard ops only
    metadata = {prop.key[len(METADATA_PREFIX):]: json.loads(prop.value) for prop in proto.metadata_props
                if prop.key.startswith(METADATA_PREFIX)}
    assert (metadata["opset"], metadata["custom_ops"], metadata["max_length"]) == (20, "standard", 64)
    assert "export        onnx, fp32, cpu, max length 64, opset 20, custom ops standard\n" in result.stdout


def test_generation_export_applies_opset_custom_ops_and_max_length(tmp_path, monkeypatch):
    """--task causal-lm-with-past used to write opset 18 with the ort lowerings at the model's full length,
    whatever was asked, while the summary claimed the options."""
    import onnx

    import exporters.decoder
    from exporters.formats import GRAPH_FORMATS
    from reformer.sampling import DECODER_CONFIG_NAME

    received = {}
    export_causal_lm_with_past = exporters.decoder.export_causal_lm_with_past

    def recording(*arguments, **options):
        received.update(options)
        return export_causal_lm_with_past(*arguments, **options)

    monkeypatch.setattr(exporters.decoder, "export_causal_lm_with_past", recording)
    monkeypatch.chdir(tmp_path)
    result = run_cli(["--model", "tiny", "--task", "causal-lm-with-past", "--format", "onnx", "--opset", "20",
                      "--custom-ops", "standard", "--max-length", "64", "--no-verify", "--output", "generation"])
    assert result.exit_code == 0, result.output
    assert received["max_length"] == 64  # what the graphs make of it, exporters.decoder's tests check
    with open(tmp_path / "generation" / DECODER_CONFIG_NAME, encoding="utf-8") as handle:
        description = json.load(handle)
    assert description["opset"] == 20 and set(description["lowerings"].values()) == {"standard"}
    for name in GRAPH_FORMATS["onnx"].decoder_files.values():
        proto = onnx.load(tmp_path / "generation" / name)
        assert onnx_opset(proto) == 20, name
        assert all(node.domain == "" for node in proto.graph.node) and not proto.functions, name
    assert "export        onnx, fp32, cpu, max length 64, opset 20, custom ops standard\n" in result.stdout


def test_generation_report_names_the_final_directory(tmp_path, monkeypatch):
    from exporters.verification_report import VerificationReport, VerificationRow

    def passing(model, folder, fmt, **options):
        return VerificationReport(fmt, folder, [VerificationRow("torchscript", "cpu", (1, 1), "fp32", passed=True)])

    monkeypatch.setattr("exporters.decoder.verify_decoder", passing)
    monkeypatch.chdir(tmp_path)
    result = run_cli(["--model", "tiny", "--task", "causal-lm-with-past", "--format", "torchscript",
                      "--output", "generation", "--report", "report.json"])
    assert result.exit_code == 0, result.output
    report = load_report(tmp_path / "report.json")
    assert report["output"] == report["verification"]["path"] == "generation"
    assert STAGING_PREFIX not in (tmp_path / "report.json").read_text()
    assert report["settings"] == {"format": "torchscript", "dtype": "fp32", "device": "cpu", "max_length": 256}
    assert_versions_recorded(report["versions"])
    assert sorted(os.listdir(tmp_path)) == ["generation", "report.json"]


def export_notes_of(directory: str, folder, monkeypatch) -> tuple[list[str], list[str], dict]:
    """Export the checkpoint to TorchScript without verification, in folder: (the report's notes, the summary's
    note lines, the graph's metadata)."""
    from exporters.torchscript import load_metadata

    monkeypatch.chdir(folder)
    result = run_cli(["--model", directory, "--format", "torchscript", "--no-verify", "--output", "lm.pt",
                      "--report", "report.json"])
    assert result.exit_code == 0, result.output
    note_lines = [line for line in result.stdout.splitlines() if re.match(r"note\s", line)]
    return load_report(folder / "report.json")["notes"], note_lines, load_metadata(str(folder / "lm.pt"))


@pytest.mark.parametrize("hash_seed", [None, 3])
def test_summary_notes_a_config_without_hash_seed(hash_seed, tmp_path, monkeypatch):
    """transformers draws new LSH rotations on every call when a config has no hash_seed: the export must
    say that no graph can match it, and what to do."""
    directory = save_checkpoint(str(tmp_path / "ckpt"), hash_seed=hash_seed)
    notes, note_lines, metadata = export_notes_of(directory, tmp_path, monkeypatch)
    assert metadata["hash_seed_defaulted"] == (hash_seed is None)
    if hash_seed is None:
        assert len(notes) == 1 and "no hash_seed" in notes[0] and "set hash_seed in config.json" in notes[0]
        assert note_lines == [f"note          {notes[0]}"]
    else:
        assert notes == [] and note_lines == []


@pytest.mark.parametrize("num_buckets", [None, 4])
def test_summary_notes_a_config_without_num_buckets(num_buckets, tmp_path, monkeypatch):
    """We resolve an unset num_buckets from max_position_embeddings, transformers from the first length a model
    runs: the export must say which buckets the graph took, and how to pin them."""
    directory = save_checkpoint(str(tmp_path / "ckpt"))  # config.json gets the resolved num_buckets: unset it
    config_path = os.path.join(directory, "config.json")
    with open(config_path) as handle:
        values = json.load(handle)
    with open(config_path, "w") as handle:
        json.dump({**values, "num_buckets": num_buckets}, handle)
    notes, note_lines, metadata = export_notes_of(directory, tmp_path, monkeypatch)
    assert metadata["num_buckets_defaulted"] == (num_buckets is None)
    if num_buckets is None:
        assert len(notes) == 1 and "no num_buckets" in notes[0] and "set num_buckets to [4, 4]" in notes[0]
        assert note_lines == [f"note          {notes[0]}"]
    else:
        assert notes == [] and note_lines == []


def test_sigterm_during_export_exits_143_and_leaves_nothing(tmp_path):
    """SIGTERM used to end the process before cleanup, leaving the hidden staging folder beside the output."""
    output_folder = tmp_path / "out"
    output_folder.mkdir()
    search_path = os.pathsep.join(filter(None, [REPOSITORY, os.environ.get("PYTHONPATH")]))
    environment = {**os.environ, "PYTHONPATH": search_path}
    process = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "--model", "tiny", "--format", "onnx", "--output",
         str(output_folder / "tiny.onnx")],
        cwd=tmp_path, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not any(name.startswith(STAGING_PREFIX) for name in os.listdir(output_folder)):
            assert process.poll() is None, "the export ended before it could be terminated"
            assert time.monotonic() < deadline, "no staging folder after 120 s"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr and stderr.splitlines()[-1] == "Error: interrupted by SIGTERM"
    assert os.listdir(output_folder) == [] and os.listdir(tmp_path) == ["out"]


def test_interrupt_exits_130_with_one_error_line(tmp_path, monkeypatch):
    def interrupted(request, progress):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "run_export", interrupted)
    monkeypatch.chdir(tmp_path)
    result = run_cli(["--format", "onnx"])
    assert result.exit_code == 128 + signal.SIGINT and "Traceback" not in result.output
    assert result.stderr.splitlines() == ["Error: interrupted by SIGINT"]

"""The C++ host (hosts/cpp) against eager PyTorch.

The host is built with CMake against the torch wheel's libtorch (cached in build/cpp-host; a fresh build
takes about 20 s of CPU). It runs the files the exporters write for causal LMs, the full forward and the
decoder (prefill + step), in both formats: TorchScript (.pt) and AOTInductor packages (.pt2). It must print the
eager logits at the last position within the first-order rounding bound of eager's computation, element by
element (tests/rounding.py; the host prints floats with 9 digits, which read back the same float32), and exactly
the tokens of eager greedy decoding. A traced TorchScript graph runs the same ATen kernels as eager (bitwise
equal on this machine; another thread count's reduction order could differ); an AOTInductor package runs
Inductor's generated C++ kernels, whose fused, vectorised reductions add in another order (up to 2e-6 on
lm_mixed here).

AOTInductor compiles take tens of seconds each on 2 cores, so the .pt2 files are compiled once per module, for
lm_mixed only (the forward package, and the decoder package with its two models): together about 2 minutes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from exporters.aoti import export_aoti
from exporters.decoder import export_causal_lm_with_past
from reformer.sampling import DECODER_CONFIG_NAME as DECODER_METADATA
from exporters.specs import TASKS
from exporters.torchscript import METADATA_NAME, export_torchscript
from reformer import ReformerConfig, ReformerModelWithLMHead, tokenizer
from reformer.generation import generate
from rounding import assert_within, rounding_bound
from tiny_configs import CASES_BY_NAME

REPO = Path(__file__).resolve().parents[2]
BUILD_DIR = REPO / "build" / "cpp-host"
BYTE_LM = REPO / "models" / "byte-lm"
BYTE_LM_PROMPT = "    def __init__(self"


@pytest.fixture(scope="module")
def host() -> Path:
    build = subprocess.run(
        ["bash", str(REPO / "hosts" / "cpp" / "build.sh"), str(BUILD_DIR)],
        capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=900,
    )
    assert build.returncode == 0, f"building the C++ host failed:\n{build.stderr[-4000:]}"
    return Path(build.stdout.strip().splitlines()[-1])


def tiny_model(case_name: str) -> ReformerModelWithLMHead:
    torch.manual_seed(0)
    # A wide initialisation, so that greedy decoding does not settle on one token and tests little.
    config = ReformerConfig(**{**CASES_BY_NAME[case_name].config_values, "initializer_range": 0.5})
    return ReformerModelWithLMHead(config).eval()


FORMATS = ("torchscript", "aoti")
KINDS = ("forward", "decoder")
SUFFIX = {"torchscript": ".pt", "aoti": ".pt2"}


def export_forward(model: ReformerModelWithLMHead, folder: Path, fmt: str) -> Path:
    """The file of `reformer-export --format torchscript` or `--format aoti`: (input_ids, attention_mask) ->
    (logits, buckets of each LSH layer), with its description (the maximum length the host enforces)."""
    path = folder / f"model{SUFFIX[fmt]}"
    export = export_torchscript if fmt == "torchscript" else export_aoti
    export(model, TASKS["causal-lm"], str(path))
    return path


def export_decoder(model: ReformerModelWithLMHead, folder: Path, fmt: str) -> Path:
    """decoder.pt or decoder.pt2 of the causal-lm-with-past export: a prefill, and a step with the cache."""
    export_causal_lm_with_past(model, str(folder / "decoder"), fmt, verify=False)
    return folder / "decoder" / f"decoder{SUFFIX[fmt]}"


EXPORTS = {"forward": export_forward, "decoder": export_decoder}


@pytest.fixture(scope="module")
def lm_mixed_packages(tmp_path_factory) -> dict[str, Path]:
    """lm_mixed's AOTInductor packages (kind -> .pt2 file), compiled once for the whole module."""
    folder = tmp_path_factory.mktemp("packages")
    model = tiny_model("lm_mixed")
    return {kind: EXPORTS[kind](model, folder, "aoti") for kind in KINDS}


@pytest.fixture
def lm_mixed_file(request, tmp_path):
    """exported(fmt, kind) -> a file of lm_mixed: TorchScript exported afresh (about a second), AOTInductor
    packages from lm_mixed_packages (compiled on first use)."""
    def exported(fmt: str, kind: str) -> Path:
        if fmt == "aoti":
            return request.getfixturevalue("lm_mixed_packages")[kind]
        return EXPORTS[kind](tiny_model("lm_mixed"), tmp_path, fmt)
    return exported


def run_host(host: Path, *arguments) -> subprocess.CompletedProcess:
    return subprocess.run([str(host), *map(str, arguments)], capture_output=True, text=True, timeout=300)


def assert_close_to_eager(host_logits: list[float], model: ReformerModelWithLMHead, prompt: list[int]) -> None:
    def eager_last_logits():
        return model(input_ids=torch.tensor([prompt])).logits[0, -1]

    with torch.no_grad():
        expected = eager_last_logits()
    assert_within(torch.tensor(host_logits), expected, rounding_bound(eager_last_logits), "last_logits")


def check_against_eager(host: Path, path: Path, model: ReformerModelWithLMHead, prompt: list[int], new_tokens: int,
                        use_cache: bool) -> None:
    result = run_host(host, path, "--ids", ",".join(map(str, prompt)), "--generate", new_tokens)
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    assert_close_to_eager(output["last_logits"], model, prompt)
    expected = generate(model, torch.tensor([prompt]), new_tokens, use_cache=use_cache)[0, len(prompt):].tolist()
    assert len(set(expected)) > 1, "greedy decoding repeats one token: the comparison would test little"
    assert output["generated"] == expected


# Prompt plus generated tokens cross several chunks (chunk length 4), so chunked LSH attention runs.
CASES = [("lm_mixed", [5, 17, 3, 9, 11], 20), ("lm_lsh_factorised", [7, 1, 28], 24)]


@pytest.mark.parametrize("case_name, prompt, new_tokens", CASES)
@pytest.mark.parametrize("kind", KINDS)
def test_host_matches_eager(host, tmp_path, kind, case_name, prompt, new_tokens):
    model = tiny_model(case_name)
    # A forward file reruns the grown sequence for every token, as eager decoding without the cache does; a
    # decoder file carries the cache, as eager decoding with it does (for LSH layers the two may differ).
    check_against_eager(host, EXPORTS[kind](model, tmp_path, "torchscript"), model, prompt, new_tokens,
                        use_cache=kind == "decoder")


# The packages of lm_mixed only: each config costs three AOTInductor compiles (the verifier's tests run every
# config through AOTInductor; here the host's loading, cache passing and checks are under test).
@pytest.mark.parametrize("kind", KINDS)
def test_host_runs_packages_as_eager(host, lm_mixed_file, kind):
    case_name, prompt, new_tokens = CASES[0]
    check_against_eager(host, lm_mixed_file("aoti", kind), tiny_model(case_name), prompt, new_tokens,
                        use_cache=kind == "decoder")


@pytest.mark.parametrize("kind", KINDS)
def test_host_runs_the_shipped_byte_lm(host, tmp_path, kind):
    model = ReformerModelWithLMHead.from_pretrained(BYTE_LM)
    check_against_eager(host, EXPORTS[kind](model, tmp_path, "torchscript"), model, tokenizer.encode(BYTE_LM_PROMPT),
                        48, use_cache=kind == "decoder")


# One id: the shortest prompt every file must take (length 1 is its own case for torch.export's dynamic sizes).
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
def test_without_generate_prints_only_last_logits(host, lm_mixed_file, fmt, kind):
    result = run_host(host, lm_mixed_file(fmt, kind), "--ids", "3")
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    assert list(output) == ["last_logits"]
    assert_close_to_eager(output["last_logits"], tiny_model("lm_mixed"), [3])


@pytest.mark.parametrize("arguments, status", [
    (["--ids", "1,2"], 2),                              # no model
    (["{model}"], 2),                                    # no --ids
    (["{model}", "--ids", "1,x"], 2),
    (["{model}", "--ids", "1,2", "--generate", "-1"], 2),
    (["{model}", "--ids", "1", "--beam", "2"], 2),
    (["{model}", "--ids", ",".join(["1"] * 30), "--generate", "4"], 2),  # 33 positions, the model takes 32
    (["{decoder}", "--ids", ",".join(["1"] * 30), "--generate", "4"], 2),
    (["{package}", "--ids", ",".join(["1"] * 30), "--generate", "4"], 2),
    (["{decoder_package}", "--ids", ",".join(["1"] * 30), "--generate", "4"], 2),
    (["{missing}", "--ids", "1,2"], 1),
    (["{missing_package}", "--ids", "1,2"], 1),
    (["{not_torchscript}", "--ids", "1,2"], 1),
    (["{not_a_package}", "--ids", "1,2"], 1),
    (["{torchscript_as_package}", "--ids", "1,2"], 1),
])
def test_errors_are_one_line_without_output(host, tmp_path, lm_mixed_file, arguments, status):
    paths = {"missing": tmp_path / "missing.pt", "missing_package": tmp_path / "missing.pt2",
             "not_torchscript": tmp_path / "config.json", "not_a_package": tmp_path / "config.pt2",
             "torchscript_as_package": tmp_path / "torchscript.pt2"}
    paths["not_torchscript"].write_text("{}")
    paths["not_a_package"].write_text("{}")
    files = {"model": ("torchscript", "forward"), "decoder": ("torchscript", "decoder"),
             "package": ("aoti", "forward"), "decoder_package": ("aoti", "decoder")}
    for name, (fmt, kind) in files.items():
        if f"{{{name}}}" in arguments:
            paths[name] = lm_mixed_file(fmt, kind)
    if "{torchscript_as_package}" in arguments:  # the format comes from the name: this is read as a package
        lm_mixed_file("torchscript", "forward").rename(paths["torchscript_as_package"])
    result = run_host(host, *(argument.format_map(paths) for argument in arguments))
    assert result.returncode == status
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def assert_one_line_error(result: subprocess.CompletedProcess, status: int, message: str) -> None:
    assert (result.returncode, result.stdout) == (status, ""), result.stderr
    assert result.stderr.splitlines() == [message]


# lm_mixed has vocab_size 30: the ids 0..29 run, and the first id outside them is named with its position.
@pytest.mark.parametrize("ids, bad_id, position", [
    ("1,30", 30, 1),
    ("29,0,999,-1", 999, 2),
    ("-3,5", -3, 0),
])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
def test_ids_outside_the_vocabulary_are_argument_errors(host, lm_mixed_file, fmt, kind, ids, bad_id, position):
    path = lm_mixed_file(fmt, kind)
    assert run_host(host, path, "--ids", "29,0").returncode == 0
    result = run_host(host, path, "--ids", ids, "--generate", 2)
    assert_one_line_error(result, 2, f"reformer-host: id {bad_id} at position {position} of --ids (counting from 0) "
                                     "is outside the vocabulary: ids must be from 0 to 29 (vocab_size 30)")


def without_vocab_size(metadata: dict) -> dict:
    metadata = {key: value for key, value in metadata.items() if key != "vocab_size"}
    metadata["config"] = {key: value for key, value in metadata["config"].items() if key != "vocab_size"}
    return metadata


def resave_torchscript(path: Path, resaved: Path, name: str, edit) -> None:
    """The TorchScript file at path saved again with its extra file `name` given by edit(description) (None:
    without the extra file)."""
    extra_files = {name: ""}
    module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra_files)
    description = edit(json.loads(extra_files[name]))
    torch.jit.save(module, str(resaved), _extra_files={} if description is None else {name: json.dumps(description)})


def resave_package(path: Path, resaved: Path, name: str, edit) -> None:
    """The AOTInductor package at path written again with its models' metadata entry `name` given by
    edit(description) (None: without the entry). Each model's metadata is a JSON object of strings in the
    archive's *_metadata.json files."""
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(resaved, "w") as target:
        for record in source.infolist():
            content = source.read(record)
            if record.filename.endswith("_metadata.json"):
                metadata = json.loads(content)
                description = edit(json.loads(metadata.pop(name)))
                if description is not None:
                    metadata[name] = json.dumps(description)
                content = json.dumps(metadata).encode()
            target.writestr(record, content)


# Resaved from an export: without any description, or with one that lacks the vocabulary size.
@pytest.mark.parametrize("edit", [lambda description: None, without_vocab_size], ids=["none", "without_vocab_size"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
def test_a_file_without_vocabulary_size_is_refused(host, tmp_path, lm_mixed_file, fmt, kind, edit):
    resaved = tmp_path / f"resaved{SUFFIX[fmt]}"
    resave = resave_torchscript if fmt == "torchscript" else resave_package
    resave(lm_mixed_file(fmt, kind), resaved, METADATA_NAME if kind == "forward" else DECODER_METADATA, edit)
    result = run_host(host, resaved, "--ids", "1,2")
    assert_one_line_error(result, 1, f"reformer-host: {resaved} states no vocabulary size in its description "
                                     "(reformer_export.json config.vocab_size or decoder_config.json vocab_size), "
                                     "so its ids cannot be checked; is it a file of reformer-export?")


@pytest.mark.parametrize("arguments", [["--help"], ["-h"], ["{model}", "--ids", "1,999", "-h"]])
def test_help_prints_the_usage_on_stdout(host, tmp_path, arguments):
    result = run_host(host, *(argument.format(model=tmp_path / "missing.pt") for argument in arguments))
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert result.stdout.startswith("usage: reformer-host MODEL --ids 5,17,42 [--generate N]\n")
    for topic in ("MODEL is a TorchScript file (.pt) or an AOTInductor package (.pt2)", "--format torchscript",
                  "--format aoti", "decoder.pt or decoder.pt2", "--ids I,J,...", "--generate N", "-h, --help",
                  '"last_logits"', '"generated"', "Exit status: 0"):
        assert topic in result.stdout


def test_usage_errors_point_to_help(host):
    result = run_host(host, "--beam", "2")
    assert_one_line_error(result, 2, "reformer-host: unknown option --beam (usage: reformer-host MODEL --ids "
                                     "5,17,42 [--generate N]; --help for more)")

"""The C++ host (hosts/cpp) against eager PyTorch.

The host is built with CMake against the torch wheel's libtorch (cached in build/cpp-host; a fresh build
takes about 20 s of CPU). It runs the two TorchScript files the exporters write for causal LMs (the full
forward, and the prefill + decoder-step file), and must print the eager logits at the last position within
1e-5 (max abs: the traced graph runs the same ATen kernels as eager; only the reduction order of another
thread count could differ; on this machine they are bitwise equal) and exactly the tokens of eager greedy
decoding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from exporters.decoder import CONFIG_NAME as DECODER_METADATA
from exporters.decoder import export_causal_lm_with_past
from exporters.specs import TASKS
from exporters.torchscript import METADATA_NAME, export_torchscript
from reformer import ReformerConfig, ReformerModelWithLMHead, tokenizer
from reformer.generation import generate
from tiny_configs import CASES_BY_NAME

REPO = Path(__file__).resolve().parents[2]
BUILD_DIR = REPO / "build" / "cpp-host"
BYTE_LM = REPO / "models" / "byte-lm"
BYTE_LM_PROMPT = "    def __init__(self"
ATOL = 1e-5


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


def export_forward(model: ReformerModelWithLMHead, folder: Path) -> Path:
    """The file of `reformer-export --format torchscript`: forward(input_ids, attention_mask) -> (logits,
    buckets of each LSH layer), with its metadata (the maximum length the host enforces)."""
    path = folder / "model.pt"
    export_torchscript(model, TASKS["causal-lm"], str(path))
    return path


def export_decoder(model: ReformerModelWithLMHead, folder: Path) -> Path:
    """decoder.pt of the causal-lm-with-past export: forward = prefill, step = one token with the cache."""
    export_causal_lm_with_past(model, str(folder / "decoder"), "torchscript", verify=False)
    return folder / "decoder" / "decoder.pt"


EXPORTS = {"forward": export_forward, "decoder": export_decoder}


def run_host(host: Path, *arguments) -> subprocess.CompletedProcess:
    return subprocess.run([str(host), *map(str, arguments)], capture_output=True, text=True, timeout=300)


def check_against_eager(host: Path, path: Path, model: ReformerModelWithLMHead, prompt: list[int], new_tokens: int,
                        use_cache: bool) -> None:
    result = run_host(host, path, "--ids", ",".join(map(str, prompt)), "--generate", new_tokens)
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    with torch.no_grad():
        expected_logits = model(input_ids=torch.tensor([prompt])).logits[0, -1]
    difference = (torch.tensor(output["last_logits"]) - expected_logits).abs().max().item()
    assert difference <= ATOL, f"last_logits: max abs diff {difference:.3g}"
    expected = generate(model, torch.tensor([prompt]), new_tokens, use_cache=use_cache)[0, len(prompt):].tolist()
    assert len(set(expected)) > 1, "greedy decoding repeats one token: the comparison would test little"
    assert output["generated"] == expected


# Prompt plus generated tokens cross several chunks (chunk length 4), so chunked LSH attention runs.
@pytest.mark.parametrize("case_name, prompt, new_tokens", [
    ("lm_mixed", [5, 17, 3, 9, 11], 20),
    ("lm_lsh_factorised", [7, 1, 28], 24),
])
@pytest.mark.parametrize("kind", list(EXPORTS))
def test_host_matches_eager(host, tmp_path, kind, case_name, prompt, new_tokens):
    model = tiny_model(case_name)
    # A forward file reruns the grown sequence for every token, as eager decoding without the cache does; a
    # decoder file carries the cache, as eager decoding with it does (for LSH layers the two may differ).
    check_against_eager(host, EXPORTS[kind](model, tmp_path), model, prompt, new_tokens, use_cache=kind == "decoder")


@pytest.mark.parametrize("kind", list(EXPORTS))
def test_host_runs_the_shipped_byte_lm(host, tmp_path, kind):
    model = ReformerModelWithLMHead.from_pretrained(BYTE_LM)
    check_against_eager(host, EXPORTS[kind](model, tmp_path), model, tokenizer.encode(BYTE_LM_PROMPT), 48,
                        use_cache=kind == "decoder")


def test_without_generate_prints_only_last_logits(host, tmp_path):
    model = tiny_model("lm_mixed")
    result = run_host(host, export_forward(model, tmp_path), "--ids", "3")
    assert result.returncode == 0, result.stderr
    assert list(json.loads(result.stdout)) == ["last_logits"]
    assert len(json.loads(result.stdout)["last_logits"]) == model.config.vocab_size


@pytest.mark.parametrize("arguments, status", [
    (["--ids", "1,2"], 2),                              # no model
    (["{model}"], 2),                                    # no --ids
    (["{model}", "--ids", "1,x"], 2),
    (["{model}", "--ids", "1,2", "--generate", "-1"], 2),
    (["{model}", "--ids", "1", "--beam", "2"], 2),
    (["{model}", "--ids", ",".join(["1"] * 30), "--generate", "4"], 2),  # 33 positions, the model takes 32
    (["{decoder}", "--ids", ",".join(["1"] * 30), "--generate", "4"], 2),
    (["{missing}", "--ids", "1,2"], 1),
    (["{not_torchscript}", "--ids", "1,2"], 1),
])
def test_errors_are_one_line_without_output(host, tmp_path, arguments, status):
    model = tiny_model("lm_mixed")
    paths = {"missing": tmp_path / "missing.pt", "not_torchscript": tmp_path / "config.json"}
    paths["not_torchscript"].write_text("{}")
    if any("{model}" in argument for argument in arguments):
        paths["model"] = export_forward(model, tmp_path)
    if any("{decoder}" in argument for argument in arguments):
        paths["decoder"] = export_decoder(model, tmp_path)
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
@pytest.mark.parametrize("kind", list(EXPORTS))
def test_ids_outside_the_vocabulary_are_argument_errors(host, tmp_path, kind, ids, bad_id, position):
    path = EXPORTS[kind](tiny_model("lm_mixed"), tmp_path)
    assert run_host(host, path, "--ids", "29,0").returncode == 0
    result = run_host(host, path, "--ids", ids, "--generate", 2)
    assert_one_line_error(result, 2, f"reformer-host: id {bad_id} at position {position} of --ids (counting from 0) "
                                     "is outside the vocabulary: ids must be from 0 to 29 (vocab_size 30)")


def without_vocab_size(metadata: dict) -> dict:
    metadata = {key: value for key, value in metadata.items() if key != "vocab_size"}
    metadata["config"] = {key: value for key, value in metadata["config"].items() if key != "vocab_size"}
    return metadata


# Resaved from an export: without any metadata, or with metadata that lacks the vocabulary size.
@pytest.mark.parametrize("metadata", ["none", "without_vocab_size"])
@pytest.mark.parametrize("kind", list(EXPORTS))
def test_a_file_without_vocabulary_size_is_refused(host, tmp_path, kind, metadata):
    path = EXPORTS[kind](tiny_model("lm_mixed"), tmp_path)
    name = METADATA_NAME if kind == "forward" else DECODER_METADATA
    extra_files = {name: ""}
    module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra_files)
    extra_files = {} if metadata == "none" else {name: json.dumps(without_vocab_size(json.loads(extra_files[name])))}
    resaved = tmp_path / "resaved.pt"
    torch.jit.save(module, str(resaved), _extra_files=extra_files)
    result = run_host(host, resaved, "--ids", "1,2")
    assert_one_line_error(result, 1, f"reformer-host: {resaved} states no vocabulary size in its metadata "
                                     "(reformer_export.json config.vocab_size or decoder_config.json vocab_size), "
                                     "so its ids cannot be checked; is it a reformer-export TorchScript file?")


@pytest.mark.parametrize("arguments", [["--help"], ["-h"], ["{model}", "--ids", "1,999", "-h"]])
def test_help_prints_the_usage_on_stdout(host, tmp_path, arguments):
    result = run_host(host, *(argument.format(model=tmp_path / "missing.pt") for argument in arguments))
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert result.stdout.startswith("usage: reformer-host MODEL.pt --ids 5,17,42 [--generate N]\n")
    for topic in ("MODEL.pt is either", "--format torchscript", "decoder.pt", "--ids I,J,...", "--generate N",
                  "-h, --help", '"last_logits"', '"generated"', "Exit status: 0"):
        assert topic in result.stdout


def test_usage_errors_point_to_help(host):
    result = run_host(host, "--beam", "2")
    assert_one_line_error(result, 2, "reformer-host: unknown option --beam (usage: reformer-host MODEL.pt --ids "
                                     "5,17,42 [--generate N]; --help for more)")

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

from exporters.decoder import export_causal_lm_with_past
from exporters.specs import TASKS
from exporters.torchscript import export_torchscript
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
    (["{model}", "--ids", "1,999"], 1),                  # id outside the vocabulary
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

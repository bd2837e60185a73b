"""The JavaScript runtime (js/) against Python's `reformer.runtime.OnnxGenerator` on the same export of byte-lm:
the command `node js/bin/generate.mjs` (onnxruntime-node), and the page js/web/ in a headless Chromium
(onnxruntime-web, WebAssembly) driven by playwright-core. Greedy ids must be equal, prompts of different lengths
in one batch. `cd js && npm test` tests the runtime itself (sampling, text, errors) on a committed fixture.

Skipped, saying what to install, without Node.js, js/node_modules or Chromium."""

import functools
import http.server
import json
import os
import shutil
import subprocess
import threading

import pytest

from exporters import api
from reformer import tokenizer
from reformer.runtime import CPU, OnnxGenerator

REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JS = os.path.join(REPOSITORY, "js")
PROMPTS = ["import ", "    def __init__(self", "x = "]
NEW_TOKENS = 24
MAX_LENGTH = 128  # a smaller export than byte-lm's 1,024 positions: faster, and enough for these prompts
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def node_or_skip() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("needs Node.js 20 or later (e.g. apt-get install -y nodejs npm)")
    if not os.path.isdir(os.path.join(JS, "node_modules", "onnxruntime-node")):
        pytest.skip("needs js/node_modules: cd js && ONNXRUNTIME_NODE_INSTALL_CUDA=skip npm ci")
    return node


def chromium_or_skip() -> str:
    found = next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)
    if found is None:
        pytest.skip("needs Chromium (Debian: apt-get install -y chromium)")
    return found


@pytest.fixture(scope="module")
def generation_folder(tmp_path_factory):
    """byte-lm exported as causal-lm-with-past ONNX graphs (the default custom ops), and Python's greedy new
    tokens for PROMPTS generated together."""
    node_or_skip()
    folder = str(tmp_path_factory.mktemp("js") / "byte-lm")
    api.run_export(api.ExportRequest("onnx", model="byte-lm", task=api.GENERATION_TASK, output=folder,
                                     max_length=MAX_LENGTH, verify=False))
    prompts = [tokenizer.encode(text) for text in PROMPTS]
    sequences = OnnxGenerator(folder, providers=[CPU]).generate(prompts, NEW_TOKENS)
    return folder, sequences[:, max(map(len, prompts)):].tolist()


def run_node(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([node_or_skip(), *arguments], capture_output=True, text=True, timeout=120, cwd=REPOSITORY)


def node_greedy_ids(folder: str, backend: str) -> dict:
    """{"prompt_ids", "ids", "text"} of `generate.mjs --json` on PROMPTS, greedy, on a backend (node or wasm)."""
    prompts = [argument for text in PROMPTS for argument in ("--prompt", text)]
    finished = run_node("js/bin/generate.mjs", folder, *prompts, "--max-new-tokens", str(NEW_TOKENS),
                        "--backend", backend, "--json")
    assert finished.returncode == 0, finished.stderr
    return json.loads(finished.stdout)


def test_node_command_generates_pythons_greedy_ids(generation_folder):
    folder, expected = generation_folder
    result = node_greedy_ids(folder, "node")
    assert result["prompt_ids"] == [tokenizer.encode(text) for text in PROMPTS]
    assert result["ids"] == expected
    assert result["text"] == [tokenizer.decode(row) for row in expected]


@pytest.mark.slow
@pytest.mark.parametrize("custom_ops, opset", [("standard", None), ("ort", None), ("onnx-attention", 23)])
def test_every_lowering_runs_on_onnxruntime_web(custom_ops, opset, tmp_path):
    """onnxruntime-web's WebAssembly build (in Node: `generate.mjs --backend wasm`) runs every lowering: the
    default (`auto`) in the page's test, the others here, on the tiny model."""
    node_or_skip()
    folder = str(tmp_path / "tiny")
    api.run_export(api.ExportRequest("onnx", model="tiny", task=api.GENERATION_TASK, output=folder,
                                     custom_ops=custom_ops, opset=opset, max_length=MAX_LENGTH, verify=False))
    prompts = [tokenizer.encode(text) for text in PROMPTS]
    expected = OnnxGenerator(folder, providers=[CPU]).generate(prompts, NEW_TOKENS)[:, max(map(len, prompts)):]
    assert node_greedy_ids(folder, "wasm")["ids"] == expected.tolist()


def test_node_command_refuses_bad_input_in_one_line(generation_folder):
    folder, _ = generation_folder
    finished = run_node("js/bin/generate.mjs", folder, "--prompt", "x", "--max-new-tokens", str(MAX_LENGTH + 1))
    assert finished.returncode == 2 and finished.stdout == ""
    assert finished.stderr == (f"generate.mjs: error: a prompt of 1 tokens plus {MAX_LENGTH + 1} new tokens needs "
                               f"{MAX_LENGTH + 1} positions; the export's max_length is {MAX_LENGTH}\n")


@pytest.fixture
def served_repository(generation_folder, tmp_path):
    """An HTTP server (http.server, as `python -m http.server` serves) of a folder holding js/ and the export
    as model/; yields its address."""
    root = tmp_path / "site"
    root.mkdir()
    os.symlink(JS, root / "js")
    os.symlink(generation_folder[0], root / "model")
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


def test_web_page_streams_pythons_greedy_ids_in_chromium(generation_folder, served_repository, tmp_path):
    _, expected = generation_folder
    chromium = chromium_or_skip()
    if not os.path.isdir(os.path.join(JS, "node_modules", "playwright-core")):
        pytest.skip("needs playwright-core: cd js && npm ci")
    screenshot = tmp_path / "page.png"
    prompts = [argument for text in PROMPTS for argument in ("--prompt", text)]
    finished = run_node("js/test/browser/drive-page.mjs", "--url", f"{served_repository}/js/web/?model=/model/",
                        "--chromium", chromium, "--screenshot", str(screenshot), *prompts,
                        "--max-new-tokens", str(NEW_TOKENS))
    assert finished.returncode == 0, finished.stderr
    result = json.loads(finished.stdout)
    assert result["ids"] == expected
    assert result["texts"] == [tokenizer.decode(row) for row in expected]
    assert result["updates"] >= NEW_TOKENS  # the text arrived step by step, not at the end
    assert screenshot.stat().st_size > 10_000

"""A real Triton Inference Server on repositories `reformer-export --format triton` writes for the default model
(Python backend running ONNX Runtime): concurrent clients over HTTP and gRPC with mixed lengths, every answer
checked against the graph run directly (OnnxModel, OnnxGenerator) on that request alone; bad requests get errors
and the server keeps serving; stopping it leaves nothing running; a minute of the soak (benchmarks/soak.py: 16
clients through reformer-serve, 1 request in 20 malformed) gets every answer right.

Needs a server (nvidia-pytriton's, from the serve extra, or a tritonserver on the PATH) and, for the wheel's
Python backend, models running with numpy 1.x (the serve extra's; see exporters/triton/server.py): skipped
otherwise, e.g. in an environment with numpy 2, unless REFORMER_EXPORT_PYTHONPATH names the package folders of
one with numpy 1.x, as in
    REFORMER_EXPORT_PYTHONPATH=$PWD:/path/to/numpy1-venv/lib/python3.11/site-packages \
        pytest tests/exporters/test_triton_server.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

tritonclient_utils = pytest.importorskip("tritonclient.utils", reason="needs tritonclient (the serve extra)")

REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPOSITORY_ROOT)  # `benchmarks` is a folder of scripts, not an installed package

from benchmarks.soak import TASK, export_repository, malformed_requests  # noqa: E402
from exporters.triton.client import TritonModel  # noqa: E402
from exporters.triton.server import (PYTHONPATH_VARIABLE, TritonServer, TritonServerError,  # noqa: E402
                                     child_processes, find_server, processes_in_group)
from reformer.runtime import OnnxGenerator, OnnxModel  # noqa: E402

TASK_MODEL = "byte-lm-causal-lm"
GENERATION_MODEL = "byte-lm-causal-lm-with-past"
VOCAB, MAX_LENGTH = 258, 1024  # models/byte-lm/config.json
CLIENTS = 8
# The server answers bitwise as OnnxModel does alone: it runs the same ONNX file on the same ONNX Runtime build,
# processor and session options (reformer.runtime.open_session), and requests of equal length are batched as
# rows computed independently. Only the batch size differs, and this graph's CPU kernels split a batch between
# threads and tiles by rows and columns (matrix products) or by rows (softmax, layer norm), never within one
# element's sum. Measured: bitwise equal.
ServerError = tritonclient_utils.InferenceServerException


def server_unavailable() -> str | None:
    try:
        _, wheel_folder = find_server()
    except TritonServerError as error:
        return str(error)
    if wheel_folder and int(np.__version__.split(".")[0]) >= 2 and not os.environ.get(PYTHONPATH_VARIABLE):
        return (f"nvidia-pytriton's Python backend needs numpy 1.x (this environment has {np.__version__}): set "
                f"{PYTHONPATH_VARIABLE} to the package folders of an environment with numpy<2")
    return None


UNAVAILABLE = server_unavailable()
# In the default run (CI): 50 to 90 s on 2 cores, most of it exporting and verifying the default model's task
# and generation graphs before the server starts (the test extra has nvidia-pytriton's server), and the minute
# of soak, about 70 s with its server's start and its expected answers.
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(server, task graph path, generation graphs folder): one repository with the default model's task model
    and its generation model, both exported and verified by run_export."""
    repository = tmp_path_factory.mktemp("triton") / "repository"
    results = export_repository(str(repository))
    assert len(results) == 2 and all(result.passed and result.verification is not None for result in results)
    assert [result.output for result in results] == [str(repository), f"{repository}-generation"]
    assert sorted(os.listdir(repository)) == [TASK_MODEL, GENERATION_MODEL]
    server = TritonServer(str(repository), http_port=None, grpc_port=None, metrics_port=None)
    server.start()
    yield server, repository / TASK_MODEL / "1" / "model.onnx", repository / GENERATION_MODEL / "1" / "graphs"
    process_group = server.process.pid if server.process else None
    assert server.stop() is not None
    assert process_group is None or not processes_in_group(process_group), "nothing left running"


def client(server, index: int, model: str) -> TritonModel:
    """Even clients speak HTTP, odd ones gRPC."""
    protocol = "http" if index % 2 == 0 else "grpc"
    return TritonModel(model, server.http_url if protocol == "http" else server.grpc_url, protocol)


def task_request(rng, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Mixed lengths (one chunk, several, not multiples of the chunk length), one or two rows, some padded."""
    length = [1, 17, 64, 100, 129, 300, 17, 100][index % CLIENTS]
    rows = 1 + index % 2
    ids = rng.integers(2, VOCAB, (rows, length)).astype(np.int64)
    mask = np.ones_like(ids)
    if index % 3 == 0 and length > 4:
        mask[-1, -length // 4:] = 0
    return ids, mask


def test_concurrent_clients_get_what_the_graph_gives_each_request_alone(served):
    server, graph, _ = served
    direct = OnnxModel(graph)
    requests = {(client_index, turn): task_request(np.random.default_rng(client_index * 10 + turn),
                                                   client_index + turn)
                for client_index in range(CLIENTS) for turn in range(3)}
    start = threading.Barrier(CLIENTS)

    def run_client(client_index: int) -> dict:
        with client(server, client_index, TASK_MODEL) as model:
            start.wait()
            return {turn: model(*requests[client_index, turn])["logits"] for turn in range(3)}

    with ThreadPoolExecutor(CLIENTS) as pool:
        answers = dict(zip(range(CLIENTS), pool.map(run_client, range(CLIENTS))))
    for (client_index, turn), (ids, mask) in requests.items():
        expected = direct(ids, mask)["logits"]
        served_logits = answers[client_index][turn]
        assert served_logits.shape == expected.shape
        kept = mask.astype(bool)  # outputs at padded positions are not defined
        np.testing.assert_array_equal(served_logits[kept], expected[kept])
    with client(server, 0, TASK_MODEL) as model:
        stats = model.client.get_inference_statistics(TASK_MODEL)["model_stats"][0]
    assert stats["execution_count"] < len(requests), "the dynamic batcher ran some requests together"


def test_concurrent_generation_gives_the_tokens_of_each_request_alone(served):
    server, _, graphs = served
    direct = OnnxGenerator(graphs)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(2, VOCAB, (1, length)).astype(np.int64) for length in (5, 70, 5, 33, 129, 70, 12, 40)]
    options = [{}] * CLIENTS
    options[3] = {"do_sample": True, "seed": 11, "temperature": 0.8, "top_k": 20, "top_p": 0.9}
    options[6] = {"repetition_penalty": 1.3}
    greedy = direct.generate(prompts[5], 8)
    options[5] = {"eos_token_id": int(greedy[0, prompts[5].shape[1] + 2])}  # stops after 3 new tokens
    start = threading.Barrier(CLIENTS)

    def run_client(index: int) -> np.ndarray:
        with client(server, index, GENERATION_MODEL) as model:
            start.wait()
            return model.generate(prompts[index], 8, **options[index])

    with ThreadPoolExecutor(CLIENTS) as pool:
        answers = list(pool.map(run_client, range(CLIENTS)))
    for index, answer in enumerate(answers):
        np.testing.assert_array_equal(answer, direct.generate(prompts[index], 8, **options[index]))
    assert answers[5].shape[1] <= prompts[5].shape[1] + 3 < answers[0].shape[1] + prompts[5].shape[1] - 5


@pytest.mark.parametrize("malformed", malformed_requests(VOCAB, MAX_LENGTH), ids=lambda malformed: malformed.name)
def test_bad_requests_get_errors_and_the_server_keeps_serving(served, malformed):
    """The malformed requests of the soak (benchmarks/soak.py), one by one."""
    server, graph, _ = served
    for index in (0, 1):  # HTTP, then gRPC
        with client(server, index, TASK_MODEL if malformed.role == TASK else GENERATION_MODEL) as model:
            with pytest.raises(ServerError, match=malformed.message):
                model.infer(malformed.arrays)
    assert server.is_ready() and server.process.poll() is None
    ids = np.array([[5, 6, 7]], dtype=np.int64)
    with client(server, 1, TASK_MODEL) as model:
        assert model.client.is_model_ready(TASK_MODEL)
        np.testing.assert_array_equal(model(ids)["logits"], OnnxModel(graph)(ids)["logits"])


def test_reformer_serve_serves_until_sigterm_and_stops_cleanly(served):
    """The documented command, as a user runs it: ready line on stdout, a request answered, SIGTERM stops it."""
    import signal

    from exporters.triton.server import free_port

    server, graph, _ = served
    ports = [str(free_port()) for _ in range(3)]
    command = [sys.executable, "-m", "cli.serve", server.repository, "--http-port", ports[0], "--grpc-port", ports[1],
               "--metrics-port", ports[2]]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = process.stdout.readline()
        assert ready.startswith(f"Serving {TASK_MODEL}, {GENERATION_MODEL} over HTTP at localhost:{ports[0]}"), ready
        ids = np.array([[9, 8, 7, 6]], dtype=np.int64)
        with TritonModel(TASK_MODEL, f"localhost:{ports[1]}", "grpc") as model:
            np.testing.assert_array_equal(model(ids)["logits"], OnnxModel(graph)(ids)["logits"])
    finally:
        process.send_signal(signal.SIGTERM)
        _, errors = process.communicate(timeout=60)
    assert process.returncode == 0 and "Stopped (server exit status 0)." in errors


def test_model_process_killed_mid_request_gives_an_error_and_stops_reformer_serve(served):
    """kill -9 of the generation model's process while it generates: the client gets an error within seconds,
    not a hang, and reformer-serve, which Triton would leave reporting the model ready while failing every request
    to it, exits with status 1 and one line naming the model. A server of its own: the module's keeps serving."""
    import signal
    import time

    from exporters.triton.server import free_port, model_processes

    server, _, _ = served
    ports = [str(free_port()) for _ in range(3)]
    command = [sys.executable, "-m", "cli.serve", server.repository, "--http-port", ports[0], "--grpc-port", ports[1],
               "--metrics-port", ports[2]]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outcome = {}

    def long_generation() -> None:
        started = time.monotonic()
        try:
            with TritonModel(GENERATION_MODEL, f"localhost:{ports[0]}", "http") as model:
                outcome["tokens"] = model.generate(np.full((8, 1), 5, dtype=np.int64), MAX_LENGTH - 1)
        except ServerError as error:
            outcome["error"] = str(error)
        outcome["seconds"] = time.monotonic() - started

    try:
        assert process.stdout.readline().startswith("Serving "), process.stderr.read()
        (triton,) = child_processes(process.pid)
        generation = [pid for pid, model in model_processes(triton).items() if model == GENERATION_MODEL]
        request = threading.Thread(target=long_generation)
        request.start()
        time.sleep(1.0)
        assert request.is_alive(), f"the request ended before its model's process could be killed: {outcome}"
        os.kill(generation[0], signal.SIGKILL)
        request.join(60)
        assert not request.is_alive(), "the client still waits 60 s after its model's process was killed"
        _, errors = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.communicate(timeout=60)
    assert "tokens" not in outcome and "is not healthy" in outcome["error"], outcome
    assert process.returncode == 1 and "Traceback" not in errors
    assert errors.splitlines()[-1] == (f"Error: the process of model {GENERATION_MODEL} ended: tritonserver answers "
                                       "its requests with errors and does not restart it")
    assert server.is_ready()  # the module's server, on the same repository, is untouched



def test_a_minute_of_soak_answers_every_valid_request_right_and_refuses_every_malformed_one(served, tmp_path):
    """benchmarks/soak.py for 60 s on the module's repository (its 10-minute run is in results/): 16 clients,
    forward and generation requests checked against the graphs run on each request alone, through a reformer-serve
    of its own; the server's memory is judged only by the 10-minute run."""
    server, _, _ = served
    out = tmp_path / "soak.md"
    result = subprocess.run([sys.executable, "-m", "benchmarks.soak", "--repository", server.repository,
                             "--duration", "60", "--out", str(out)],
                            cwd=REPOSITORY_ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = re.search(r"requests (\d+) in \d+ s: valid (\d+) \(errors (\d+), wrong answers (\d+)\), malformed "
                        r"(\d+) \(refused with their error (\d+)\), unanswered (\d+)", result.stdout)
    requests, valid, errors, wrong, malformed, refused, unanswered = map(int, summary.groups())
    assert requests == valid + malformed and valid > 10 * malformed > 0
    assert errors == 0 and wrong == 0, result.stdout[-4000:]
    assert refused == malformed and unanswered == 0, result.stdout[-4000:]
    assert "verdict: passed" in out.read_text()

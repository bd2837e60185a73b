"""A served model under load: `reformer-serve` on a Triton repository holding the default model's task model and
its generation model, concurrent clients (half HTTP, half gRPC) sending forward and generation requests of mixed
lengths, batch sizes and padding, and 1 request in --malformed-every malformed; every answer is checked against
`OnnxModel` / `OnnxGenerator` on that request alone, and the server's resident memory is sampled over the run.

    python -m benchmarks.soak [--repository REPO] [--duration 600] [--clients 16] [--malformed-every 20]
                              [--sample-seconds 5] [--out FILE.md]

(from the repository root). Without --repository, the default model is exported and verified as
`reformer-export --format triton` does, task causal-lm and causal-lm-with-past, and the two models are put in
one repository in a temporary folder (`export_repository`). The server is the real command, reformer-serve
(`python -m cli.serve`), in a process of its own on free ports.

The requests come from a pool made before the load starts, each with its expected answer computed in this
process by OnnxModel or OnnxGenerator on that request alone, so that checking an answer under load costs one
comparison:
- forward (`forward_pool`): 1 to 3 rows of 1 to 1,024 tokens; some requests send no mask, some pad their last
  row, some every row by different amounts. The logits must equal the direct ones bitwise at every position the
  mask keeps (outputs at padded positions are not defined). Bitwise, not within a tolerance: the server runs the
  same file on the same ONNX Runtime build with the same session options (reformer.runtime.open_session) and
  batches only rows of equal length, which are computed independently (exporters/triton/backend.py); only the
  batch size differs, and this graph's CPU kernels split a batch by rows and columns, never within one
  element's sum (tests/exporters/test_triton_server.py).
- generation (`generation_pool`): 1 or 2 prompts of one length (1 to 300 tokens), 4 to 16 new tokens, greedy,
  with a repetition penalty, sampled from a seed, or stopping at an end token; the ids must equal
  OnnxGenerator's on the request alone.
- malformed (`malformed_requests`, each client taking them in turn): wrong dtype, rank or mask, ids outside the
  vocabulary, too long, empty, missing inputs, bad generation options; each must be answered with an error that
  names what is wrong (not an answer, not a hang).

Each client is a thread with its own connection to each model, sending one request after another: every
--malformed-every-th a malformed one, the others drawn at random (its own seed) from the pool. Latency is the
client's, from sending to the checked answer. Every --sample-seconds, the resident memory (VmRSS) of each process
in the server's session (tritonserver and its models' Python-backend stub processes) is read.

The first minute is the warm-up. Beside the clients, from the start, one more thread sends each model its
largest batch as one request (`largest_requests`): max_batch_size rows, the most one execution can hold by the
model's config.pbtxt (the dynamic batcher's preferred sizes, where set, cannot exceed it), of the maximum
length: forward, every row of max_length tokens; generation, prompts one token short of it and 2 new tokens.
Each goes once over HTTP and once over gRPC, is checked and counted with the other requests, and the server's
memory is read right after the last answer. The reason: each model process's ONNX Runtime arena keeps the
memory of the largest run it has served until the session ends, by design (reformer.runtime; the server does
not shrink it). Without the warm-up, the dynamic batcher forms its largest batch (long requests of several
clients arriving together) at a random time, and the growth after the first minute measured when that
happened, not a leak. With the arenas at their high-water marks before the baseline, the criterion judges
memory the server keeps taking.

Acceptance (exit status 1 otherwise, with one line per failure): no error on a valid request, no wrong answer,
every malformed request refused with its error, every request answered within GRACE_SECONDS of the end, the
server serving to the end and stopping cleanly (exit status 0) and, in runs of 2 minutes or more, the server's
resident memory at the end less than 10% above the baseline: the first sample after the first minute and
after the warm-up (a run whose warm-up does not finish before the last sample fails).

The markdown file (--out, default results/cpu-<date>-soak.md) holds the processor, the load average before and
after, the versions, the command, the setup, the tables (requests by kind and protocol; resident memory over
time, right after the warm-up included) and the verdict; the same is printed.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, NamedTuple

import numpy as np

from benchmarks.cli import OneLineErrors
from benchmarks.gpu_checks.environment import environment_lines
from benchmarks.graph_cost import resident_bytes
from benchmarks.serving import statistics_of
from benchmarks.tables import markdown_table, text_table

TASK, GENERATION = "task", "generation"  # the two served models' roles
FORWARD, MALFORMED = "forward", "malformed"  # request kinds, with GENERATION
PROTOCOLS = ("http", "grpc")  # even clients, odd clients
RIGHT, ERROR, WRONG = "as expected", "error", "wrong answer"
FORWARD_LENGTHS = (1, 7, 17, 64, 100, 129, 200, 300, 513, 1024)  # one chunk, several, not multiples of one
PROMPT_LENGTHS = (1, 5, 12, 33, 70, 129, 300)
NEW_TOKENS = (4, 8, 16)
GRACE_SECONDS = 60  # after the end, how long a request in flight may take before it counts as unanswered
MEMORY_GROWTH_LIMIT = 0.10  # of the server's resident memory after the first minute
MEMORY_BASELINE_SECONDS = 60
SERVER_START_SECONDS = 180


@dataclass
class ForwardRequest:
    arrays: dict[str, np.ndarray]  # input_ids and, where the request sends one, attention_mask
    expected: np.ndarray  # OnnxModel's logits on this request alone
    kind: ClassVar[str] = FORWARD

    def send(self, clients: dict) -> np.ndarray:
        return clients[TASK].infer(self.arrays)["logits"]

    def is_right(self, logits: np.ndarray) -> bool:
        kept = self.arrays.get("attention_mask", np.ones_like(self.arrays["input_ids"])).astype(bool)
        return logits.shape == self.expected.shape and np.array_equal(logits[kept], self.expected[kept])


@dataclass
class GenerationRequest:
    input_ids: np.ndarray  # B, T: prompts of one length
    max_new_tokens: int
    options: dict
    expected: np.ndarray  # OnnxGenerator.generate on this request alone: the prompts and the new tokens
    kind: ClassVar[str] = GENERATION

    def send(self, clients: dict) -> np.ndarray:
        return clients[GENERATION].generate(self.input_ids, self.max_new_tokens, **self.options)

    def is_right(self, ids: np.ndarray) -> bool:
        return np.array_equal(ids, self.expected)


@dataclass
class MalformedRequest:
    name: str
    role: str  # TASK or GENERATION: the model it is sent to
    arrays: dict[str, np.ndarray]
    message: str  # a regular expression the error must match
    kind: ClassVar[str] = MALFORMED

    def send(self, clients: dict) -> dict:
        return clients[self.role].infer(self.arrays)


def malformed_requests(vocab_size: int, max_length: int) -> list[MalformedRequest]:
    """Requests the served models must refuse, each with (a pattern of) the error: Triton's own checks (dtype,
    rank, required inputs, batch sizes) and the Python backend's (exporters/triton/backend.py)."""
    ids, new_tokens = np.ones((1, 3), dtype=np.int64), np.array([[2]], dtype=np.int32)
    return [
        MalformedRequest("int32 ids", TASK, {"input_ids": ids.astype(np.int32)},
                         "data-type is 'INT32'.*expects 'INT64'"),
        MalformedRequest("ids of rank 1", TASK, {"input_ids": np.ones(5, dtype=np.int64)},
                         "unexpected shape.*Expected \\[-1,-1\\], got \\[5\\]"),
        MalformedRequest("id outside the vocabulary", TASK, {"input_ids": np.array([[3, vocab_size]], dtype=np.int64)},
                         "outside the vocabulary"),
        MalformedRequest("too long", TASK, {"input_ids": np.ones((1, max_length + 1), dtype=np.int64)},
                         f"serves at most {max_length}"),
        MalformedRequest("empty", TASK, {"input_ids": np.ones((1, 0), dtype=np.int64)}, "input_ids is empty"),
        MalformedRequest("mask of another shape", TASK,
                         {"input_ids": ids, "attention_mask": np.ones((1, 4), dtype=np.int64)}, "shape of input_ids"),
        MalformedRequest("mask not 0 or 1", TASK, {"input_ids": ids, "attention_mask": ids * 2},
                         "must hold 0 \\(padding\\) and 1 \\(token\\) only"),
        MalformedRequest("no input_ids", TASK, {"attention_mask": ids}, "input input_ids is missing"),
        MalformedRequest("more positions than the export's", GENERATION,
                         {"input_ids": np.ones((1, max_length - 4), dtype=np.int64),
                          "max_new_tokens": np.array([[10]], dtype=np.int32)}, "positions"),
        MalformedRequest("temperature 0", GENERATION,
                         {"input_ids": ids, "max_new_tokens": new_tokens, "do_sample": np.array([[True]]),
                          "temperature": np.array([[0.0]], np.float32)}, "temperature must be positive"),
        MalformedRequest("no max_new_tokens", GENERATION, {"input_ids": ids}, "missing required input.*max_new_tokens"),
        MalformedRequest("max_new_tokens 0", GENERATION, {"input_ids": ids, "max_new_tokens": new_tokens * 0},
                         "max_new_tokens must be at least 1"),
    ]


def export_repository(repository: str, progress=lambda message: None) -> list:
    """The default model's task model and generation model in one Triton repository, each exported and verified
    by exporters.api.run_export (`reformer-export --format triton` writes one model to a repository: the
    generation model is exported to `<repository>-generation`, then moved in). Returns both ExportResults; the
    repository holds both models only when both passed."""
    from exporters import api

    generation = f"{repository}-generation"
    results = []
    for task, output in (("causal-lm", repository), (api.GENERATION_TASK, generation)):
        results.append(api.run_export(api.ExportRequest("triton", task=task, output=output), progress))
        if not results[-1].passed:
            return results
    for name in os.listdir(generation):
        shutil.move(os.path.join(generation, name), os.path.join(repository, name))
    os.rmdir(generation)
    return results


def served_models(repository: str) -> dict[str, str]:
    """{TASK: the task model's name, GENERATION: the generation model's}; SystemExit when the repository does not
    hold one of each."""
    from exporters.choices import GENERATION_TASK
    from exporters.triton.layout import CONFIG_NAME

    names = sorted(name for name in os.listdir(repository)
                   if os.path.isfile(os.path.join(repository, name, CONFIG_NAME)))
    generation = [name for name in names if name.endswith(f"-{GENERATION_TASK}")]
    task = [name for name in names if name not in generation]
    if len(task) != 1 or len(generation) != 1:
        raise SystemExit(f"{repository} must hold one task model and one {GENERATION_TASK} model (reformer-export "
                         f"--format triton, one of each), not {', '.join(names) or 'no model'}")
    return {TASK: task[0], GENERATION: generation[0]}


def forward_pool(graph: str, vocab_size: int, max_length: int) -> list[ForwardRequest]:
    """Three requests per length: 1 to 3 rows (1 past 512 tokens), with a full mask, with none, with the last
    row padded, or with every row padded by different amounts (padding ids are 0, the pad token)."""
    from reformer.runtime import OnnxModel

    model, rng, pool = OnnxModel(graph), np.random.default_rng(0), []
    lengths = [length for length in FORWARD_LENGTHS if length <= max_length]
    for index in range(3 * len(lengths)):
        length = lengths[index % len(lengths)]
        rows = 1 if length > 512 else 1 + index % 3
        ids = rng.integers(2, vocab_size, (rows, length)).astype(np.int64)
        mask = np.ones_like(ids)
        padding = index % 4  # 0: full mask, 1: no mask, 2: last row padded, 3: every row padded
        for row in range(rows):
            if padding == 3 or (padding == 2 and row == rows - 1):
                kept = max(1, length * (row + 1) // (rows + 1))
                mask[row, kept:], ids[row, kept:] = 0, 0
        arrays = {"input_ids": ids} if padding == 1 else {"input_ids": ids, "attention_mask": mask}
        pool.append(ForwardRequest(arrays, model(ids, mask)["logits"]))
    return pool


def generation_pool(generator) -> list[GenerationRequest]:
    """Four requests per prompt length, one of each option set: greedy, repetition penalty, sampling from a
    seed, greedy stopping at an end token (the third new token of greedy's first row)."""
    rng, pool = np.random.default_rng(1), []
    for index in range(4 * len(PROMPT_LENGTHS)):
        ids = rng.integers(2, generator.vocab_size, (1 + index % 2, PROMPT_LENGTHS[index % len(PROMPT_LENGTHS)]))
        new_tokens = NEW_TOKENS[index % len(NEW_TOKENS)]
        options = [{}, {"repetition_penalty": 1.3},
                   {"do_sample": True, "seed": index, "temperature": 0.8, "top_k": 20, "top_p": 0.9},
                   None][index % 4]
        if options is None:
            options = {"eos_token_id": int(generator.generate(ids, new_tokens)[0, ids.shape[1] + 2])}
        pool.append(GenerationRequest(ids, new_tokens, options, generator.generate(ids, new_tokens, **options)))
    return pool


def largest_batch(repository: str, name: str) -> tuple[int, int]:
    """(rows, tokens) of the largest batch the model's config.pbtxt lets one execution hold: max_batch_size
    rows (a single request may hold that many; the dynamic batcher's preferred sizes cannot exceed it) of its
    max_length."""
    from exporters.triton.layout import CONFIG_NAME, parse_config

    config = parse_config(Path(repository, name, CONFIG_NAME).read_text(encoding="utf-8"))
    return config.max_batch_size, int(config.parameters["max_length"].string_value)


def largest_requests(graph: str, generator, repository: str, models: dict[str, str]) -> list:
    """The warm-up's requests, each model's largest batch as one request with its expected answer: forward,
    every row of the maximum length; generation, greedy, every prompt one token short of it and 2 new tokens
    (the prefill of the longest prompt a request may send, then a step over a cache of every position)."""
    from reformer.runtime import OnnxModel

    rng = np.random.default_rng(2)
    rows, length = largest_batch(repository, models[TASK])
    ids = rng.integers(2, generator.vocab_size, (rows, length)).astype(np.int64)
    forward = ForwardRequest({"input_ids": ids}, OnnxModel(graph)(ids)["logits"])
    rows, length = largest_batch(repository, models[GENERATION])
    prompts = rng.integers(2, generator.vocab_size, (rows, length - 1)).astype(np.int64)
    return [forward, GenerationRequest(prompts, 2, {}, generator.generate(prompts, 2))]


@dataclass
class RequestPool:
    valid: list  # ForwardRequest and GenerationRequest, drawn at random by the clients
    malformed: list[MalformedRequest]  # taken in turn
    largest: list  # the warm-up's (largest_requests)


def request_pool(repository: str, models: dict[str, str]) -> RequestPool:
    """The requests for the repository's models, the valid ones with their expected answers."""
    from exporters.triton.backend import GENERATION_GRAPHS, TASK_GRAPH
    from exporters.triton.layout import VERSION
    from reformer.runtime import OnnxGenerator

    graph = os.path.join(repository, models[TASK], VERSION, TASK_GRAPH)
    if os.path.isdir(graph):  # the folder form, for a graph with external data
        graph = os.path.join(graph, TASK_GRAPH)
    generator = OnnxGenerator(os.path.join(repository, models[GENERATION], VERSION, GENERATION_GRAPHS))
    valid = forward_pool(graph, generator.vocab_size, generator.max_length) + generation_pool(generator)
    return RequestPool(valid, malformed_requests(generator.vocab_size, generator.max_length),
                       largest_requests(graph, generator, repository, models))


class ServeProcess:
    """reformer-serve on the repository in a process of its own, as a user runs it, on free ports."""

    def __init__(self, repository: str, folder: str):
        from exporters.triton.server import free_port

        self.ports = {name: free_port() for name in ("http", "grpc", "metrics")}
        self.command = [sys.executable, "-m", "cli.serve", repository] + [
            argument for name, port in self.ports.items() for argument in (f"--{name}-port", str(port))]
        self.errors_path = os.path.join(folder, "reformer-serve.err")
        self.process: subprocess.Popen | None = None
        self.server_pid: int | None = None  # its tritonserver's

    @property
    def http_url(self) -> str:
        return f"localhost:{self.ports['http']}"

    def url(self, protocol: str) -> str:
        return f"localhost:{self.ports[protocol]}"

    def start(self) -> float:
        """Seconds until reformer-serve says it serves; SystemExit with its error when it does not."""
        from exporters.triton.server import child_processes

        begin = time.monotonic()
        with open(self.errors_path, "w", encoding="utf-8") as errors:
            self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=errors, text=True)
        timer = threading.Timer(SERVER_START_SECONDS, self.process.kill)  # a server never ready ends the readline
        timer.start()
        ready = self.process.stdout.readline()
        timer.cancel()
        if not ready.startswith("Serving "):
            self.stop()
            raise SystemExit(f"reformer-serve did not start: {Path(self.errors_path).read_text().strip()}")
        self.server_pid = child_processes(self.process.pid)[0]
        return time.monotonic() - begin

    def stop(self) -> int:
        """SIGTERM, as a supervisor stops it; its exit status (0: stopped cleanly)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.communicate()
        return self.process.returncode


@dataclass
class MemorySample:
    seconds: float  # since the start of the load
    load_average: float  # the machine's, over 1 minute
    resident: dict[str, int]  # VmRSS bytes by process: tritonserver, each model's stub process
    # RssShmem bytes summed over the same processes: the Python backend passes tensors through shared memory that
    # tritonserver and the stubs both map, so these pages are in several processes' VmRSS.
    shared: int

    @property
    def total(self) -> int:
        return sum(self.resident.values())


@dataclass
class Load:
    """What the clients and the memory sampler saw."""

    records: list = field(default_factory=list)  # (kind, protocol, outcome, seconds)
    problems: list = field(default_factory=list)  # (kind, protocol, outcome, message): the first few
    memory: list[MemorySample] = field(default_factory=list)
    warm_up: MemorySample | None = None  # right after the warm-up's last answer; None: it did not finish
    unanswered: int = 0  # clients still waiting GRACE_SECONDS after the end
    connect_errors: list = field(default_factory=list)
    seconds: float = 0.0

    def record(self, kind: str, protocol: str, outcome: str, seconds: float, message: str | None) -> None:
        self.records.append((kind, protocol, outcome, seconds))  # list.append is atomic: threads share it
        if outcome != RIGHT and len(self.problems) < 20:
            self.problems.append((kind, protocol, outcome, message))


def send_and_check(request, clients: dict) -> tuple[str, float, str | None]:
    """(outcome, seconds, what went wrong) of one request."""
    from tritonclient.utils import InferenceServerException

    begin = time.perf_counter()
    try:
        answer = request.send(clients)
    except InferenceServerException as error:
        seconds, message = time.perf_counter() - begin, str(error)
        if request.kind == MALFORMED and re.search(request.message, message):
            return RIGHT, seconds, None
        return ERROR, seconds, message[:300]
    seconds = time.perf_counter() - begin
    if request.kind == MALFORMED:
        return WRONG, seconds, f"{request.name}: answered instead of refused"
    return (RIGHT, seconds, None) if request.is_right(answer) else (WRONG, seconds, "differs from the direct run")


def connect(server: ServeProcess, models: dict, protocols: tuple, start: threading.Barrier,
            load: Load) -> dict | None:
    """{protocol: {role: TritonModel}} once every client has connected (the start barrier); None when one could
    not (its error is recorded, and the run stops at the barrier)."""
    from exporters.triton.client import TritonModel

    connections = {}
    for protocol in protocols:
        try:
            connections[protocol] = {role: TritonModel(name, server.url(protocol), protocol)
                                     for role, name in models.items()}
        except Exception as error:
            load.connect_errors.append(f"{protocol}: {str(error)[:300]}")
            start.abort()
            return None
    try:
        start.wait()
    except threading.BrokenBarrierError:  # another client could not connect
        return None
    return connections


def send_and_record(request, clients: dict, protocol: str, load: Load) -> None:
    try:
        outcome, seconds, message = send_and_check(request, clients)
    except Exception as error:  # a broken connection counts as an error; the client goes on
        outcome, seconds, message = ERROR, 0.0, f"{type(error).__name__}: {str(error)[:300]}"
    load.record(request.kind, protocol, outcome, seconds, message)


def close(connections: dict) -> None:
    for clients in connections.values():
        for client in clients.values():
            client.close()


def run_client(index: int, server: ServeProcess, models: dict, pool: RequestPool, every: int, duration: float,
               start: threading.Barrier, load: Load) -> None:
    """One client until `duration` seconds after the start: every `every`-th request malformed (the kinds in
    turn), the others drawn from the valid pool."""
    protocol, rng = PROTOCOLS[index % 2], np.random.default_rng(index)
    connections = connect(server, models, (protocol,), start, load)
    if connections is None:
        return
    stop_at, turn, malformed_sent = time.monotonic() + duration, 0, 0
    while time.monotonic() < stop_at:
        if (turn + index) % every == every - 1:
            request = pool.malformed[(index + malformed_sent) % len(pool.malformed)]
            malformed_sent += 1
        else:
            request = pool.valid[rng.integers(len(pool.valid))]
        send_and_record(request, connections[protocol], protocol, load)
        turn += 1
    close(connections)


def run_warm_up(server: ServeProcess, models: dict, pool: RequestPool, start: threading.Barrier,
                load: Load) -> None:
    """Beside the clients from the start: each of the largest requests over HTTP, then over gRPC, checked as the
    others are; then the server's memory (load.warm_up)."""
    connections = connect(server, models, PROTOCOLS, start, load)
    if connections is None:
        return
    begin = time.monotonic()
    for protocol, clients in connections.items():
        for request in pool.largest:
            send_and_record(request, clients, protocol, load)
    load.warm_up = server_memory(server.server_pid, time.monotonic() - begin)
    close(connections)


def server_memory(server_pid: int, seconds: float) -> MemorySample:
    """The resident memory of each process of the server's session: tritonserver, and each model's stub process
    by the model's name."""
    from exporters.triton.server import model_processes, processes_in_group

    names, resident, shared = model_processes(server_pid), {}, 0
    for pid in processes_in_group(server_pid):
        label = "tritonserver" if pid == server_pid else names.get(pid, "other")
        try:
            resident[label] = resident.get(label, 0) + resident_bytes("VmRSS", pid)
            shared += resident_bytes("RssShmem", pid)
        except OSError:  # ended since it was listed
            continue
    return MemorySample(seconds, os.getloadavg()[0], resident, shared)


def run_load(server: ServeProcess, models: dict, pool: RequestPool, args) -> Load:
    load = Load()
    start = threading.Barrier(args.clients + 2)  # the clients, the warm-up, the memory sampler
    threads = [threading.Thread(target=run_client, daemon=True,
                                args=(index, server, models, pool, args.malformed_every, args.duration, start, load))
               for index in range(args.clients)]
    threads.append(threading.Thread(target=run_warm_up, daemon=True, args=(server, models, pool, start, load)))
    for thread in threads:
        thread.start()
    try:
        start.wait(timeout=SERVER_START_SECONDS)
    except threading.BrokenBarrierError:
        return load  # a client could not connect: its error is recorded
    begin = time.monotonic()
    while True:
        elapsed = time.monotonic() - begin
        load.memory.append(server_memory(server.server_pid, elapsed))
        if elapsed >= args.duration or server.process.poll() is not None:
            break
        time.sleep(min(args.sample_seconds, max(0.0, args.duration - elapsed)))
    for thread in threads:
        thread.join(max(0.0, begin + args.duration + GRACE_SECONDS - time.monotonic()))
    load.unanswered = sum(thread.is_alive() for thread in threads)
    load.seconds = time.monotonic() - begin
    return load


REQUEST_HEADER = ("kind", "protocol", "requests", RIGHT, "errors", "wrong answers", "p50 ms", "p99 ms")


def request_rows(load: Load) -> list[tuple]:
    """One row per kind and protocol, then all: requests, as expected, errors, wrong answers, p50 and p99 ms."""
    rows = []
    for kind in (FORWARD, GENERATION, MALFORMED):
        for protocol in PROTOCOLS + ("all",):
            chosen = [record for record in load.records if record[0] == kind and protocol in (record[1], "all")]
            seconds = [record[3] for record in chosen]
            counts = [sum(record[2] == outcome for record in chosen) for outcome in (RIGHT, ERROR, WRONG)]
            latency = ([f"{np.percentile(seconds, q) * 1e3:.1f}" for q in (50, 99)] if seconds else ["-", "-"])
            rows.append((kind, protocol, len(chosen), *counts, *latency))
    return rows


def memory_rows(load: Load, models: dict, duration: float) -> list[tuple]:
    """The samples nearest to each minute (to each sixth of a run under 2 minutes), the last, and the one right
    after the warm-up in its place: seconds, 1-min load, MiB of tritonserver, of each model's process, of all, of
    shared memory in them."""
    step = 60.0 if duration >= 120 else duration / 6
    marks = list(np.arange(0.0, load.memory[-1].seconds, step)) + [load.memory[-1].seconds] if load.memory else []
    nearest = [min(range(len(load.memory)), key=lambda index: abs(load.memory[index].seconds - mark))
               for mark in marks]
    labelled = [(load.memory[index], f"{load.memory[index].seconds:.0f}") for index in dict.fromkeys(nearest)]
    if load.warm_up:
        labelled.append((load.warm_up, f"{load.warm_up.seconds:.0f} (warm-up done)"))
    rows = []
    for sample, label in sorted(labelled, key=lambda pair: pair[0].seconds):
        columns = [sample.resident.get(name, 0) for name in ("tritonserver", models[TASK], models[GENERATION])]
        rows.append((label, f"{sample.load_average:.2f}",
                     *(f"{value / 2**20:.0f}" for value in columns + [sample.total, sample.shared])))
    return rows


class MemoryGrowth(NamedTuple):
    baseline_mib: float
    end_mib: float
    fraction: float  # end / baseline - 1
    baseline_when: str  # "after the first minute", or after a warm-up that took longer


def memory_growth(load: Load) -> MemoryGrowth | None:
    """The growth judged: from the first sample after the first minute and after the warm-up, to the last.
    None for runs under 2 minutes, and where the warm-up did not finish before the last sample."""
    if not load.memory or load.memory[-1].seconds < 2 * MEMORY_BASELINE_SECONDS or load.warm_up is None:
        return None
    after = max(MEMORY_BASELINE_SECONDS, load.warm_up.seconds)
    baseline = next((sample for sample in load.memory if sample.seconds >= after), None)
    if baseline is None:
        return None
    when = ("after the first minute" if load.warm_up.seconds <= MEMORY_BASELINE_SECONDS else
            f"after the warm-up ({baseline.seconds:.0f} s)")
    end = load.memory[-1].total
    return MemoryGrowth(baseline.total / 2**20, end / 2**20, end / baseline.total - 1, when)


def long_run(load: Load) -> bool:
    """Runs of 2 minutes or more: only they have their memory judged."""
    return bool(load.memory) and load.memory[-1].seconds >= 2 * MEMORY_BASELINE_SECONDS


def counts(load: Load) -> dict[str, int]:
    valid = [record for record in load.records if record[0] in (FORWARD, GENERATION)]
    malformed = [record for record in load.records if record[0] == MALFORMED]
    return {"requests": len(load.records), "valid": len(valid), "malformed": len(malformed),
            "errors": sum(record[2] == ERROR for record in valid),
            "wrong": sum(record[2] == WRONG for record in valid),
            "refused": sum(record[2] == RIGHT for record in malformed)}


def failures(load: Load, stop_status: int | None) -> list[str]:
    """The acceptance criteria the run missed (empty: passed)."""
    numbers, growth, failed = counts(load), memory_growth(load), []
    if load.connect_errors:
        failed.append(f"{len(load.connect_errors)} clients could not connect: {load.connect_errors[0]}")
    if numbers["errors"] or numbers["wrong"]:
        failed.append(f"{numbers['errors']} errors and {numbers['wrong']} wrong answers on valid requests")
    if numbers["refused"] != numbers["malformed"]:
        failed.append(f"{numbers['malformed'] - numbers['refused']} of {numbers['malformed']} malformed requests "
                      "not refused with their error")
    if load.unanswered:
        failed.append(f"{load.unanswered} clients still waiting for an answer {GRACE_SECONDS} s after the end")
    if stop_status != 0:
        failed.append(f"reformer-serve did not serve to the end and stop cleanly: exit status {stop_status}")
    if long_run(load) and growth is None:
        failed.append("the warm-up did not finish before the last memory sample: the memory growth is not judged")
    if growth is not None and growth.fraction >= MEMORY_GROWTH_LIMIT:
        failed.append(f"the server's resident memory grew {growth.fraction:.1%} {growth.baseline_when} "
                      f"(limit {MEMORY_GROWTH_LIMIT:.0%})")
    return failed


def summary_lines(load: Load, stop_status: int | None) -> list[str]:
    numbers, growth = counts(load), memory_growth(load)
    lines = [f"requests {numbers['requests']} in {load.seconds:.0f} s: valid {numbers['valid']} (errors "
             f"{numbers['errors']}, wrong answers {numbers['wrong']}), malformed {numbers['malformed']} (refused with "
             f"their error {numbers['refused']}), unanswered {load.unanswered}",
             f"resident memory: {growth.baseline_mib:.0f} MiB {growth.baseline_when}, {growth.end_mib:.0f} MiB at "
             f"the end, growth {growth.fraction:+.1%} (limit {MEMORY_GROWTH_LIMIT:.0%})" if growth else
             ("resident memory: not judged, the warm-up did not finish before the last sample" if long_run(load)
              else "resident memory: runs under 2 minutes are not judged")]
    failed = failures(load, stop_status)
    return lines + (["verdict: passed"] if not failed else [f"verdict: FAILED: {line}" for line in failed])


def warm_up_line(pool: RequestPool, load: Load) -> str:
    forward, generation = pool.largest
    rows, length = forward.arrays["input_ids"].shape
    prompts, prompt_length = generation.input_ids.shape
    done = (f"done at {load.warm_up.seconds:.0f} s, the server's resident memory then {load.warm_up.total / 2**20:.0f} "
            "MiB" if load.warm_up else "it did not finish")
    return (f"- warm-up, beside the load from its start: each model's largest batch by its config.pbtxt as one "
            f"request (forward {rows} rows of {length:,} tokens; generation {prompts} prompts of {prompt_length:,} "
            f"tokens, {generation.max_new_tokens} new tokens, greedy), once over HTTP and once over gRPC, checked "
            f"and counted with the others; {done}")


def parse_arguments(argv=None):
    parser = OneLineErrors(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", help="a Triton repository holding a task model and a causal-lm-with-past "
                                             "model (default: export the default model's into a temporary folder)")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients, half HTTP, half gRPC")
    parser.add_argument("--malformed-every", type=int, default=20, help="every N-th request is malformed")
    parser.add_argument("--sample-seconds", type=float, default=5.0, help="how often the server's memory is read")
    parser.add_argument("--out", help="the markdown file (default results/cpu-<date>-soak.md)")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.sample_seconds <= 0:
        parser.error("--duration and --sample-seconds must be positive")
    if args.clients < 1 or args.malformed_every < 2:
        parser.error("--clients must be at least 1 and --malformed-every at least 2")
    if args.repository and not os.path.isdir(args.repository):
        parser.error(f"--repository {args.repository} is not a directory")
    return args


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = parse_arguments(argv)
    command = shlex.join(["python", "-m", "benchmarks.soak", *(sys.argv[1:] if argv is None else argv)])
    out = args.out or f"results/cpu-{time.strftime('%Y-%m-%d', time.gmtime())}-soak.md"
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="soak-") as folder:
        repository = args.repository or os.path.join(folder, "repository")
        if not args.repository:
            for result in export_repository(repository, lambda message: log(f"{message} ...")):
                if not result.passed:
                    raise SystemExit(f"export failed: {result.verification.failure_message()}")
        models = served_models(repository)
        timer = time.monotonic()
        pool = request_pool(repository, models)
        pool_seconds = time.monotonic() - timer
        server = ServeProcess(repository, folder)
        log(f"Starting {shlex.join(server.command)} ...")
        start_seconds = server.start()
        try:
            log(f"Serving; {args.clients} clients for {args.duration:.0f} s ...")
            load = run_load(server, models, pool, args)
            serving = server.process.poll() is None
            batching = {role: statistics_of(server, name) for role, name in models.items()} if serving else {}
        finally:
            stop_status = server.stop()
    setup = [f"- repository: {args.repository or 'the default model exported by this run'} ({models[TASK]}, "
             f"{models[GENERATION]}), served by `reformer-serve REPOSITORY` (`python -m cli.serve`) on free ports, "
             f"ready in {start_seconds:.1f} s",
             f"- {args.clients} clients (half HTTP, half gRPC) for {args.duration:.0f} s, 1 request in "
             f"{args.malformed_every} malformed; pool of {len(pool.valid)} valid requests (expected answers computed "
             f"in {pool_seconds:.1f} s before the load, with the warm-up's) and {len(pool.malformed)} kinds of "
             "malformed request",
             warm_up_line(pool, load),
             "- the dynamic batcher ran " + ", ".join(
                 f"{stats['inference_count'] / max(1, stats['execution_count']):.2f} requests per execution of "
                 f"{models[role]}" for role, stats in batching.items())]
    environment = environment_lines(command, load_before, os.getloadavg(), ("onnxruntime", "tritonclient",
                                                                            "nvidia-pytriton", "numpy"))
    memory_header = ("seconds", "load (1 min)", "tritonserver MiB", f"{models[TASK]} MiB", f"{models[GENERATION]} MiB",
                     "total MiB", "of which shared memory MiB")
    tables = [("Requests", REQUEST_HEADER, request_rows(load)),
              ("Server resident memory", memory_header, memory_rows(load, models, args.duration))]
    problems = [f"- {kind} over {protocol}: {outcome}: {message}" for kind, protocol, outcome, message in load.problems]
    summary = summary_lines(load, stop_status)
    print("\n".join(environment + setup))
    for title, header, rows in tables:
        print(f"\n{title}\n{text_table(header, rows)}")
    print("\n" + "\n".join(problems + summary))
    body = [f"## {title}\n\n{markdown_table(header, rows)}" for title, header, rows in tables]
    Path(out).write_text(f"# Soak: a served model under load, {time.strftime('%Y-%m-%d', time.gmtime())}\n\n"
                         + "\n".join(environment + setup) + "\n\n" + "\n\n".join(body) + "\n\n"
                         + "\n".join(problems + [f"- {line}" for line in summary]) + "\n", encoding="utf-8")
    return 0 if not failures(load, stop_status) else 1


if __name__ == "__main__":
    sys.exit(main())

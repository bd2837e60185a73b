"""Serving throughput and latency: the default model's Triton repository (`reformer-export --format triton`,
Python backend running ONNX Runtime) on a real server, 1, 4 and 16 concurrent clients, dynamic batching on and
off.

    python -m benchmarks.serving [--clients 1 4 16] [--requests 96] [--length 128] [--protocol grpc] [--out FILE]

Each client is a thread with its own tritonclient connection, sending batch-1 requests of --length random tokens
one after another; --requests in all per row (after 2 warm-up requests per client). requests/s: requests over
the row's wall time; p50 and p99: each request's latency as the client sees it. "rows per run": the model's
inferences per execution in the server's statistics, how many requests the dynamic batcher ran together.
Requests of one length batch together (the Python backend batches only equal lengths, so that batching changes
no answer; see exporters/triton/backend.py). The off rows serve the same graph with the same config less its
dynamic_batching block, from a second repository.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import threading
import time
from dataclasses import replace

import numpy as np

from benchmarks.cli import OneLineErrors
from benchmarks.tables import markdown_table, text_table

HEADER = ("dynamic batching", "clients", "requests", "requests/s", "p50 ms", "p99 ms", "rows per run")


def write_repositories(folder: str) -> tuple[str, str, str]:
    """(repository with dynamic batching, the same without, the model's name): the default model exported and
    verified by run_export, then a copy whose config has no dynamic_batching block (written by the same code)."""
    from exporters import api
    from exporters.triton.layout import CONFIG_NAME, VERSION, task_config

    batched, unbatched = os.path.join(folder, "batched"), os.path.join(folder, "unbatched")
    result = api.run_export(api.ExportRequest("triton", output=batched),
                            progress=lambda message: print(f"{message} ...", flush=True))
    if not result.passed:
        raise SystemExit(f"export failed: {result.verification.failure_message()}")
    (name,) = os.listdir(batched)
    shutil.copytree(batched, unbatched)
    graph = os.path.join(batched, name, VERSION, "model.onnx")
    config = replace(task_config(graph, "python", "cpu"), dynamic_batching=False)
    with open(os.path.join(unbatched, name, CONFIG_NAME), "w", encoding="utf-8") as handle:
        handle.write(config.text())
    return batched, unbatched, name


def measure(server, name: str, clients: int, requests: int, length: int, protocol: str) -> dict:
    """One row: `clients` threads sharing `requests` requests; latencies in seconds."""
    from exporters.triton.client import TritonModel

    url = server.http_url if protocol == "http" else server.grpc_url
    per_client = [requests // clients + (index < requests % clients) for index in range(clients)]
    latencies: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def run_client(index: int) -> None:
        rng = np.random.default_rng(index)
        with TritonModel(name, url, protocol) as model:
            for _ in range(2):  # warm-up: connection, first runs
                model.infer({"input_ids": rng.integers(2, 258, (1, length)).astype(np.int64)})
            start.wait()
            mine = []
            for _ in range(per_client[index]):
                ids = rng.integers(2, 258, (1, length)).astype(np.int64)
                begin = time.perf_counter()
                model.infer({"input_ids": ids})
                mine.append(time.perf_counter() - begin)
            with lock:
                latencies.extend(mine)

    threads = [threading.Thread(target=run_client, args=(index,)) for index in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()  # warm-ups done; a timed request takes longer than this statistics call
    before = statistics_of(server, name)
    begin = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - begin
    after = statistics_of(server, name)
    inferences, executions = (after[key] - before[key] for key in ("inference_count", "execution_count"))
    return {"requests": len(latencies), "requests_per_s": len(latencies) / wall,
            "p50": float(np.percentile(latencies, 50)), "p99": float(np.percentile(latencies, 99)),
            "rows_per_run": inferences / executions}


def statistics_of(server, name: str) -> dict:
    import tritonclient.http

    client = tritonclient.http.InferenceServerClient(server.http_url)
    try:
        return client.get_inference_statistics(name)["model_stats"][0]
    finally:
        client.close()


def main() -> None:
    parser = OneLineErrors(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients per row")
    parser.add_argument("--requests", type=int, default=96, help="timed requests per row, all clients together")
    parser.add_argument("--length", type=int, default=128, help="tokens per request")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--out", help="also write the table as markdown to this file")
    args = parser.parse_args()
    if min(args.clients) < 1 or args.requests < max(args.clients):
        parser.error("every --clients must be at least 1, and --requests at least the largest")
    from exporters.triton.server import TritonServer

    rows = []
    with tempfile.TemporaryDirectory(prefix="serving-benchmark-") as folder:
        batched, unbatched, name = write_repositories(folder)
        for label, repository in (("on", batched), ("off", unbatched)):
            with TritonServer(repository, None, None, None) as server:
                for clients in args.clients:
                    row = measure(server, name, clients, args.requests, args.length, args.protocol)
                    rows.append((label, clients, row["requests"], f"{row['requests_per_s']:.1f}",
                                 f"{row['p50'] * 1e3:.1f}", f"{row['p99'] * 1e3:.1f}", f"{row['rows_per_run']:.2f}"))
                    print(text_table(HEADER, rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(f"{name}, Python backend (ONNX Runtime, CPU), batch-1 requests of {args.length} tokens over "
          f"{args.protocol}, {platform.machine()} with {os.cpu_count()} cores")
    print(text_table(HEADER, rows))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(markdown_table(HEADER, rows) + "\n")


if __name__ == "__main__":
    main()

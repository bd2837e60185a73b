"""The generation step (issue 4): greedy tokens/s of `reformer.runtime.OnnxGenerator` against eager
`reformer.generation.generate` with the cache, on the same device in strict fp32; both must produce the same
tokens."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.gpu_checks.plan import Plan
from benchmarks.gpu_checks.runners import tf32_matmuls
from benchmarks.gpu_checks.steps import RuntimeUnavailable, log

if TYPE_CHECKING:
    from benchmarks.gpu_checks.report import Results

GENERATION_BATCHES = (1, 8)
GENERATION_PROMPT, GENERATION_NEW_TOKENS = 64, 128


def generation_model(name: str, model, plan: Plan, folder: Path, results: Results) -> None:
    """Export the decoder graphs, then time greedy generation with benchmarks/generation_speed.py's helpers:
    median of `generation_repeats` runs after one warm-up, tokens/s = batch x new tokens / seconds."""
    import numpy as np
    import torch

    from exporters.precision import model_as

    try:
        from benchmarks.generation_speed import eager_runner, median_seconds
        from exporters.decoder import export_causal_lm_with_past
        from reformer.runtime import CPU, CUDA, OnnxGenerator
    except ImportError as error:
        results.notes.append(f"generation skipped: {error} (needs exporters.decoder, reformer.runtime.OnnxGenerator "
                             f"and benchmarks/generation_speed.py)")
        return
    directory = folder / f"{name}-decoder"
    log(f"exporting {name} as causal-lm-with-past (prefill and decoder step, ONNX fp32; verified on the CPU) ...")
    start = time.perf_counter()
    _, decoder_report = export_causal_lm_with_past(model, str(directory), "onnx")
    results.exports.append({"model": name, "format": "onnx causal-lm-with-past", "dtype": "fp32", "device": "cpu",
                            "seconds": round(time.perf_counter() - start, 1),
                            "megabytes": round(sum(path.stat().st_size for path in directory.iterdir()) / 1e6, 1)})
    # reformer.runtime.open_session gives CUDA its options (an arena grown by what runs ask for, so that its size
    # means something; strict fp32).
    generator = OnnxGenerator(directory, providers=[CPU] if plan.device == "cpu" else [CUDA, CPU], threads=plan.threads)
    providers = generator.providers_in_use
    log(f"onnxruntime generator {name}: {providers}")
    if plan.device == "cuda" and providers[0] != CUDA:
        raise RuntimeUnavailable(f"onnxruntime generator fell back to {providers}")
    eager = model_as(model, "fp32", plan.device)  # a copy on CUDA: eager_runner moves the model it is given
    for batch in GENERATION_BATCHES:
        prompt = torch.randint(1, model.config.vocab_size, (batch, GENERATION_PROMPT),
                               generator=torch.Generator().manual_seed(batch))
        speeds = {}
        with tf32_matmuls(False):  # strict fp32, as the generator's CUDA sessions (use_tf32=0)
            for runtime, run in (("eager", eager_runner(eager, plan.device, prompt, GENERATION_NEW_TOKENS)),
                                 ("onnxruntime", lambda: generator.generate(prompt.numpy(), GENERATION_NEW_TOKENS))):
                log(f"generating {GENERATION_NEW_TOKENS} tokens, batch {batch}, {runtime} ...")
                seconds, speeds[f"{runtime}_tokens"] = median_seconds(run, plan.generation_repeats)
                speeds[runtime] = {"seconds": seconds, "tokens_per_second": batch * GENERATION_NEW_TOKENS / seconds}
        same_tokens = bool(np.array_equal(speeds.pop("eager_tokens"), speeds.pop("onnxruntime_tokens")))
        results.add_generation(name, batch, plan.device, providers, {
            **speeds, "same_tokens": same_tokens, "decoder_verified_max_abs": max(
                row.replay_max_abs for row in decoder_report.rows)})
        results.save()

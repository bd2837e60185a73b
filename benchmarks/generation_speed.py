"""Generation speed: ONNX Runtime (`reformer.runtime.OnnxGenerator` over the causal-lm-with-past export)
against eager PyTorch with the cache (`reformer.generation.generate`), greedy, batch 1 and 8.

    python -m benchmarks.generation_speed [--model DIR] [--batch 1 8] [--prompt-length 32] [--new-tokens 64]

Rows: eager PyTorch on the CPU, ONNX Runtime CPU, and where a GPU is present eager PyTorch on CUDA and ONNX
Runtime CUDA (IO binding, the cache stays on the device). Precision is named per row and compared like with
like (ONNX Runtime CUDA uses TF32 unless told otherwise, eager PyTorch does not): strict fp32 everywhere, so
eager runs with TF32 off and ONNX Runtime CUDA with `use_tf32=0`. Each figure is the median of --repeats timed
runs after one warm-up run; tokens/s counts new tokens of every row (batch * new tokens / seconds). "same
tokens" says whether the runtime produced eager's greedy tokens on the same device.

Model: --model (a checkpoint directory with a causal config), else a small model with random weights:
hidden 256, 6 layers alternating local and LSH (chunk 64), 2 heads x 128, feed-forward 512,
byte-level vocabulary of 320, up to 4,096 positions.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import torch

import reformer
from exporters.decoder import export_causal_lm_with_past
from reformer.generation import generate
from reformer.runtime import CPU, CUDA, OnnxGenerator

SMALL = dict(
    hidden_size=256, attention_head_size=128, num_attention_heads=2, feed_forward_size=512,
    attn_layers=["local", "lsh", "local", "lsh", "local", "lsh"], lsh_attn_chunk_length=64,
    local_attn_chunk_length=64, num_hashes=1, num_buckets=64, hash_seed=0, vocab_size=320,
    max_position_embeddings=4096, axial_pos_shape=[64, 64], axial_pos_embds_dim=[64, 192], is_decoder=True,
    hidden_dropout_prob=0.0, eos_token_id=None,
)


def load_model(directory: str | None) -> tuple[reformer.ReformerModelWithLMHead, str]:
    if directory:
        return reformer.ReformerModelWithLMHead.from_pretrained(directory).eval(), directory
    torch.manual_seed(0)
    return reformer.ReformerModelWithLMHead(reformer.ReformerConfig(**SMALL)).eval(), "small (random weights)"


def median_seconds(function, repeats: int) -> tuple[float, object]:
    result = function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def eager_runner(model, device: str, input_ids: torch.Tensor, new_tokens: int):
    model = model.to(device)
    ids = input_ids.to(device)

    def run():
        tokens = generate(model, ids, new_tokens)
        if device == "cuda":
            torch.cuda.synchronize()
        return tokens.cpu().numpy()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint directory of a causal LM (default: the small random model)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes")
    parser.add_argument("--prompt-length", type=int, default=32, help="prompt tokens per row")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per row")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median reported)")
    parser.add_argument("--export-dir", help="export into / reuse this directory (default: a temporary one)")
    args = parser.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model, model_name = load_model(args.model)
    config = model.config
    with tempfile.TemporaryDirectory() as scratch:
        export_dir = args.export_dir or os.path.join(scratch, "decoder")
        if not os.path.exists(os.path.join(export_dir, "decoder_config.json")):
            start = time.perf_counter()
            export_causal_lm_with_past(model, export_dir, "onnx")
            print(f"exported {model_name} to {export_dir} in {time.perf_counter() - start:.1f} s")
        cuda = torch.cuda.is_available()
        runtimes = [("eager PyTorch", "cpu"), ("ONNX Runtime", "cpu")]
        if cuda:
            runtimes += [("eager PyTorch", "cuda"), ("ONNX Runtime", "cuda")]
        generators = {"cpu": OnnxGenerator(export_dir, providers=[CPU])}
        if cuda:
            generators["cuda"] = OnnxGenerator(export_dir, providers=[CUDA, CPU])  # strict fp32 (tf32=False)
            if CUDA not in generators["cuda"].providers_in_use:
                print("ONNX Runtime could not load CUDA: its row runs on the CPU (onnxruntime-gpu 1.31 needs the "
                      "CUDA 13 runtime, cuBLAS and cuDNN 9)")
        card = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
        rows = []
        for batch in args.batch:
            input_ids = torch.randint(1, config.vocab_size, (batch, args.prompt_length),
                                      generator=torch.Generator().manual_seed(batch))
            reference = {}
            for runtime, device in runtimes:
                if runtime == "eager PyTorch":
                    run = eager_runner(model, device, input_ids, args.new_tokens)
                else:
                    generator = generators[device]
                    run = lambda: generator.generate(input_ids.numpy(), args.new_tokens)  # noqa: E731
                seconds, tokens = median_seconds(run, args.repeats)
                reference.setdefault(device, tokens)
                same = "yes" if np.array_equal(tokens, reference[device]) else "NO"
                rows.append((runtime, device, "fp32 (no TF32)", batch, args.new_tokens, seconds,
                             batch * args.new_tokens / seconds, same))
        model.to("cpu")
    print(f"\nmodel: {model_name}; prompt {args.prompt_length} tokens; device: {card}; torch {torch.__version__}")
    header = ("runtime", "device", "precision", "batch", "new tokens", "seconds", "tokens/s", "same tokens")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for runtime, device, precision, batch, new_tokens, seconds, rate, same in rows:
        print(f"{runtime} | {device} | {precision} | {batch} | {new_tokens} | {seconds:.3f} | {rate:,.0f} | {same}")


if __name__ == "__main__":
    main()

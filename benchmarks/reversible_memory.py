"""Peak activation memory of one training step (forward + backward) against depth, for the reversible stack
(activations recomputed layer by layer in backward) and for plain autograd (every layer's activations kept
until backward), on the CPU.

    python -m benchmarks.reversible_memory        (from the repository root)

How memory is measured: each (depth, path) runs in a fresh Python process, so no allocator state carries
over. That process builds the model, gives every parameter a zero gradient (so that gradients, which grow
with depth on both paths, are not counted as activations) and runs one small warm-up step (one-time
allocations of the thread pool and kernels). It then reads its resident set size (VmRSS), resets the kernel's
peak-RSS counter (`echo 5 > /proc/self/clear_refs`, Linux), runs the measured step and reads the peak
(VmHWM). Peak minus baseline is the most memory the step held at once: saved activations, temporaries of
forward and backward, the recomputation in the reversible backward, and the logits.
The child runs with glibc's mmap threshold fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_): every tensor of that
size or more then gets its own mapping, returned to the kernel when the tensor is freed, so resident memory
follows live tensor memory. With glibc's default (a threshold that grows up to 32 MiB) freed blocks stay in
the heap and fragment, and the peak counts memory the allocator kept rather than activations the model kept
(see README, "Training memory"). Figures are rounded to MiB.

Model: hidden 256 per stream, 4 heads x 64, feed-forward 512, alternating local and LSH layers (chunk 64,
2 hashing rounds), dropout on, causal LM head; batch 1, length 2048, where activations dominate the
parameters (1.9 MiB of fp32 weights per layer, against about 60 MiB of activations per layer kept by plain
autograd).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

DEPTHS = (2, 4, 8, 16)
LENGTH = 2048
BATCH = 1
WARM_UP_LENGTH = 128
# Allocations of at least this many bytes bypass the heap (see the docstring).
MMAP_THRESHOLD_BYTES = 64 * 1024
REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_model(depth: int, reversible: bool):
    from reformer import ReformerConfig, ReformerModelWithLMHead

    config = ReformerConfig(
        attn_layers=["local", "lsh"] * (depth // 2),
        hidden_size=256,
        attention_head_size=64,
        num_attention_heads=4,
        feed_forward_size=512,
        axial_pos_shape=[32, 64],
        axial_pos_embds_dim=[64, 192],
        max_position_embeddings=LENGTH,
        lsh_attn_chunk_length=64,
        local_attn_chunk_length=64,
        num_hashes=2,
        num_buckets=64,
        hash_seed=0,
        is_decoder=True,
        use_reversible_backward=reversible,
    )
    return ReformerModelWithLMHead(config).train()


def resident_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def training_step(model, length: int) -> None:
    import torch

    input_ids = torch.randint(1, model.config.vocab_size, (BATCH, length))
    model(input_ids=input_ids, labels=input_ids).loss.backward()


def measure(depth: int, reversible: bool) -> None:
    """In a fresh process: print the step's peak memory above the baseline, in MiB."""
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = build_model(depth, reversible)
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    training_step(model, WARM_UP_LENGTH)
    baseline = resident_kib("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
        clear_refs.write("5")  # reset the peak (VmHWM) to the current resident size
    training_step(model, LENGTH)
    print(f"{(resident_kib('VmHWM') - baseline) / 1024:.0f}")


def run_in_fresh_process(depth: int, reversible: bool) -> int:
    path = "reversible" if reversible else "plain"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.reversible_memory", "--measure", str(depth), path],
        cwd=REPOSITORY_ROOT, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_BYTES)},
        capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        last_line = (result.stderr.strip().splitlines() or ["no error output"])[-1]
        sys.exit(f"measuring depth {depth} ({path}) failed: {last_line}")
    return int(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", nargs=2, metavar=("DEPTH", "PATH"), help="internal: measure one configuration")
    arguments = parser.parse_args()
    if arguments.measure:
        depth, path = arguments.measure
        measure(int(depth), path == "reversible")
        return
    print(f"Peak activation memory of one training step, batch {BATCH}, length {LENGTH}, CPU fp32 (MiB)")
    print("| layers | reversible (MiB) | plain autograd (MiB) |")
    print("| ---: | ---: | ---: |")
    for depth in DEPTHS:
        reversible = run_in_fresh_process(depth, reversible=True)
        plain = run_in_fresh_process(depth, reversible=False)
        print(f"| {depth} | {reversible} | {plain} |", flush=True)


if __name__ == "__main__":
    main()

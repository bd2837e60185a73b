"""Every GPU check and benchmark in one run; without CUDA it runs the CPU part of them.

    python -m benchmarks.gpu_checks --out DIR [--quick] [--models tiny,small,large] [--lengths 4096,65536]
                                    [--checks verify,benchmark,generation,cost] [--threads N] [--aoti]
                                    [--budget-minutes M]

(from the repository root; benchmarks/README.md says how to run it on the device machine.)

1. Environment (environment.py): Python, torch and its CUDA device, onnxruntime and the providers it lists,
   CPU and load.
2. Verification (verification.py; models tiny, small and large): export to ONNX and TorchScript (fp32, and
   fp16 with CUDA), each with its verification twin (exports.py), and run `exporters.verify.verify_export`
   (bucket replay and near-tie certificates) on ONNX Runtime CPU and CUDA and TorchScript CPU and CUDA at its
   default shapes, the longest at batch 1 (up to 4,096 tokens on the CPU runtimes; `large` only on CUDA).
   CUDA fp32 is strict (ORT `use_tf32=0`, torch TF32 off); one more ORT CUDA group runs with TF32 on, against
   eager with TF32 allowed, under the fp16 rule (TF32 keeps fp16's 10 mantissa bits). AOTInductor packages
   (.pt2, exporters/aoti.py; with CUDA, or on the CPU with `--aoti`) are verified the same way where they were
   compiled: fp16 on CUDA, fp32 on the CPU (each package and twin is a compile).
3. Benchmarks (benchmark.py; forward only, batch 1, random weights, random token ids, no padding): eager
   PyTorch, ONNX Runtime, TorchScript and, as the reference, transformers' Reformer with the same weights and
   config, on the same device and precision (CUDA: fp32 strict, tf32, fp16; CPU: fp32); on CUDA also ONNX
   Runtime as "onnxruntime-fused", the graph exported with custom_ops "ort" (every chunk attention as ONNX
   Runtime's fused MultiHeadAttention), and as "onnxruntime-attention", with custom_ops "onnx-attention" (as
   ONNX's Attention op, opset 23; on the CPU neither pays, exporters/ops/attention.py; both also verified in
   fp16 on ONNX Runtime CUDA in step 2), and with CUDA (or
   `--aoti`) the AOTInductor package as "aoti", compiled for the device and precision. Each runtime's
   output is first compared with eager's at the timed shape, free-running (max abs and bucket flips, as
   information: the verdict is the verification step's). Timing (timing.py): `warm-up` runs, then the
   runtimes take turns, one run each per round, until `max runs` rounds or about 5 s per runtime; every run
   is bracketed by a device synchronisation and a clock read (CUDA events would miss ONNX Runtime's own
   stream); medians are reported. ONNX Runtime on CUDA runs through IO binding with inputs and outputs on the
   device, as eager's stay (runners.py). Peak memory on CUDA: for eager, transformers and TorchScript, the
   runtime's own weights plus how far `torch.cuda.max_memory_allocated` rose during one forward before the
   timed ones; for each ONNX Runtime session, how far the device's free memory dropped while it was made and
   while it ran (its arena, which holds the most any length so far needed;
   `arena_extend_strategy` kSameAsRequested keeps it close to need). Without transformers its rows are skipped
   with a note.
4. Generation (generation.py; issue 4): tokens/s of `reformer.runtime.OnnxGenerator` against eager
   `reformer.generation.generate` with the cache, batch 1 and 8, greedy, prompt then new tokens (prefill
   included), fp32 strict, on the same device, timed with benchmarks/generation_speed.py's helpers; both must
   produce the same tokens. Skipped, with a note, when those modules are absent.
5. Cost (cost.py; only when `--checks` names it, and only on the CPU): benchmarks/graph_cost.py's figures for
   each benchmarked model and length: nodes, bytes written per forward on ONNX Runtime CPU, peak resident
   memory of ONNX Runtime and of our eager PyTorch.

Order: the exports every check needs (exports.py, in parallel where the machine has the cores), verification,
generation, benchmarks (the slowest last, so a run cut short loses the least), cost. With `--budget-minutes M`,
a step, or a benchmark length in a precision, that would start more than M minutes after the start of the run
is skipped with a note ("...: skipped, time budget of M minutes spent"; steps.py); what was measured is kept.

Models (benchmarks/models.py; random weights from seed 0, causal LM, byte vocabulary of 258): `tiny` is
models/tiny; `small` and `large` are the shapes at which transformers' Reformer was first timed on an H100,
built with `max_position_embeddings` = the longest length benchmarked (so `num_buckets` follows the library's
rule for that length) and square axial positions (plan.py).

DIR gets results.json and results.md (report.py), rewritten after every step, so a run cut short keeps what it
measured; exported files go to a temporary folder that is removed at the end. The exit status is 1 when a
verification row failed or a step raised (the traceback is printed to stderr, the run goes on: steps.py);
skips, for the time budget or a runtime that cannot run here, are notes and leave it 0.
"""

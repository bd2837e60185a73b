"""Verification: run an exported graph on every runtime present and compare it with eager PyTorch on the same
device and dtype, at several shapes (batch 1 and > 1; length 1, below one chunk, odd, maximum; tail-padded
masks), reporting output error and LSH bucket agreement per runtime and shape.

Errors: max abs over the positions the attention mask keeps (outputs at masked positions are not defined,
see tests/reformer/test_parity.py), and max rel = max abs / the largest eager magnitude there (error relative
to the output's scale; element-wise ratios explode near zero).

Tolerances: fp32, `atol` (default the spec's, 1e-5): eager and the runtime run the same ops in strict fp32
(ONNX Runtime CUDA with `use_tf32=0`, torch with TF32 off), so only kernel rounding separates them.
fp16, `FP16_RELATIVE_TOLERANCE` of the output scale (at least 1): fp16 keeps 11 significant bits (epsilon
9.8e-4), and two fp16 implementations that round intermediates differently drift apart by a few ulps per
layer; 1e-2 allows ~10 ulps at the output's magnitude and still catches a wrong graph, whose errors are of
the order of the outputs themselves.

LSH turns a rounding difference at a hashing near-tie into another bucket, and a token in another bucket
attends to other keys: its output moves by far more than rounding. The report therefore counts bucket
assignments that differ from eager, and a row over tolerance says whether flipped buckets explain it or
whether the buckets agree and the graph computes something else."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from .errors import ExportError, first_line
from .precision import check_device, model_as
from .specs import INPUT_NAMES, TaskSpec

FORMATS = ("onnx", "torchscript")
RUNTIMES = {"onnx": ("onnxruntime-cpu", "onnxruntime-cuda"), "torchscript": ("torchscript-cpu", "torchscript-cuda")}
FP16_RELATIVE_TOLERANCE = 1e-2
# A rounding difference flips a token's bucket only when its two largest rotated projections lie within
# rounding of each other, which random rotations make rare: more flips than this share in the first LSH layer
# (whose inputs differ by rounding alone) mean the hashed vectors themselves differ. One flip is always
# allowed, so that short inputs with few assignments are judged too.
NEAR_TIE_FRACTION = 0.01

Runner = Callable[[torch.Tensor, torch.Tensor], list[torch.Tensor]]


@dataclass
class VerificationRow:
    runtime: str
    device: str
    shape: tuple[int, int]  # batch, length
    dtype: str
    max_abs: float = float("nan")
    max_rel: float = float("nan")
    tolerance: float = float("nan")
    bucket_agreement: float | None = None  # None: the graph has no bucket outputs
    flipped_buckets: int = 0
    total_buckets: int = 0
    first_layer_flipped: int = 0  # in the first LSH layer, whose inputs only rounding separates
    first_layer_total: int = 0
    passed: bool = False
    note: str = ""


@dataclass
class VerificationReport:
    format: str
    path: str
    rows: list[VerificationRow] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # runtimes not present, with the reason

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(row.passed for row in self.rows)

    def to_dict(self) -> dict:
        return {"format": self.format, "path": self.path, "passed": self.passed,
                "rows": [asdict(row) for row in self.rows], "skipped": list(self.skipped)}

    def summary_table(self) -> str:
        header = ("runtime", "device", "shape", "dtype", "max abs", "max rel", "tolerance", "buckets", "result")
        lines = [header]
        for row in self.rows:
            buckets = "-" if row.bucket_agreement is None else f"{100 * row.bucket_agreement:.2f}%"
            lines.append((row.runtime, row.device, f"{row.shape[0]}x{row.shape[1]}", row.dtype,
                          f"{row.max_abs:.2e}", f"{row.max_rel:.2e}", f"{row.tolerance:.2g}", buckets,
                          "pass" if row.passed else "FAIL"))
        widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
        text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
        text += [f"{row.runtime} {row.device} {row.shape[0]}x{row.shape[1]}: {row.note}"
                 for row in self.rows if row.note]
        text += [f"skipped {reason}" for reason in self.skipped]
        return "\n".join(text)

    def failure_message(self) -> str:
        """One line naming the worst failing row and its numbers ('' when the report passed)."""
        failing = [row for row in self.rows if not row.passed]
        if not failing:
            return "" if self.rows else "verification ran on no runtime"
        worst = max(failing, key=lambda row: row.max_abs if row.max_abs == row.max_abs else float("inf"))
        return (f"{len(failing)} of {len(self.rows)} checks failed; worst: {worst.runtime} {worst.device} "
                f"{worst.shape[0]}x{worst.shape[1]} {worst.dtype} max abs {worst.max_abs:.3g} > {worst.tolerance:.2g}"
                f"{'; ' + worst.note if worst.note else ''}")


def onnxruntime_providers() -> list[str]:
    """Execution providers this onnxruntime build lists (none without onnxruntime). Listing is not running:
    onnxruntime-gpu lists CUDA on machines without a GPU; `verify_export` checks the session's providers."""
    try:
        import onnxruntime
    except ImportError:
        return []
    return list(onnxruntime.get_available_providers())


def verify_export(
    model,
    spec: TaskSpec,
    path,
    fmt: str,
    *,
    dtype: str = "fp32",
    device: str = "cpu",
    atol: float | None = None,
    shapes: Sequence[tuple[int, int]] | None = None,
    runtimes: Sequence[str] | None = None,
) -> VerificationReport:
    """Run the graph at `path` on every runtime present (or those named in `runtimes`, from RUNTIMES) at
    `shapes` (batch, length; default `default_shapes`) and compare with eager `model` on the same device in
    `dtype`. `device` is the device the graph was exported on (CUDA exports get a note when no CUDA runtime
    could run them). Never raises for a failed comparison: the report carries it."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    check_device(device)
    unknown = sorted(set(runtimes or ()) - set(RUNTIMES[fmt]))
    if unknown:
        raise ExportError(f"unknown runtime {', '.join(unknown)} for {fmt}: choose from {', '.join(RUNTIMES[fmt])}")
    config = model.config
    shapes = list(shapes) if shapes is not None else default_shapes(config)
    report = VerificationReport(fmt, str(path))
    for name in runtimes or RUNTIMES[fmt]:
        runner, runtime_device, reason = open_runtime(name, fmt, str(path))
        if runner is None:
            report.skipped.append(f"{name}: {reason}")
            continue
        eager = spec.wrap(model_as(model, dtype, runtime_device), with_buckets=True)
        for batch, length in shapes:
            input_ids, attention_mask = verification_inputs(batch, length, config.vocab_size)
            report.rows.append(compare(
                runner, eager, spec, input_ids, attention_mask, name, runtime_device, dtype, atol
            ))
    if device == "cuda" and not any(row.device == "cuda" for row in report.rows):
        report.skipped.append("cuda: exported for CUDA, but no CUDA runtime could run it here")
    return report


def default_shapes(config, max_length: int | None = None) -> list[tuple[int, int]]:
    """Length 1, one below a chunk, an odd length (not a multiple of the chunk lengths) and the maximum,
    at batch 1 and > 1."""
    max_length = max_length or config.max_position_embeddings
    chunk = min(config.chunk_lengths)
    below_chunk = max(1, chunk - 1)
    odd = config.padding_multiple + config.padding_multiple // 2 + 1
    odd = odd if odd < max_length else max(1, max_length - 1)
    candidates = [(1, 1), (2, below_chunk), (3, odd), (1, odd), (2, max_length)]
    return [(batch, min(length, max_length)) for batch, length in dict.fromkeys(candidates)]


def verification_inputs(batch: int, length: int, vocab_size: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random ids; row 0 unpadded, row i > 0 keeps its first length - i * length // (batch + 1) tokens (at
    least one)."""
    generator = torch.Generator().manual_seed(seed + 1000 * batch + length)
    input_ids = torch.randint(1, max(2, vocab_size), (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):
        attention_mask[row, max(1, length - row * length // (batch + 1)):] = 0
    return input_ids, attention_mask


def open_runtime(name: str, fmt: str, path: str) -> tuple[Runner | None, str, str]:
    """(runner, device, '') for a runtime present, else (None, device, why not)."""
    device = name.split("-")[1]
    if fmt == "onnx":
        return open_onnxruntime(path, device)
    if device == "cuda" and not torch.cuda.is_available():
        return None, device, "torch sees no CUDA device"
    try:
        module = torch.jit.load(path, map_location=device)
    except Exception as error:  # a file torch cannot load is a failed verification, not a crash
        raise ExportError(f"cannot load TorchScript file {path}: {first_line(error)}") from None

    def run(input_ids, attention_mask):
        with torch.no_grad():
            outputs = module(input_ids.to(device), attention_mask.to(device))
        return [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)

    return run, device, ""


def open_onnxruntime(path: str, device: str) -> tuple[Runner | None, str, str]:
    import onnxruntime

    provider = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[device]
    if provider not in onnxruntime_providers():
        return None, device, f"onnxruntime lists no {provider}"
    # Strict fp32 on CUDA: ONNX Runtime enables TF32 by default, eager PyTorch does not (DESIGN.md).
    providers = [(provider, {"use_tf32": "0"})] if device == "cuda" else [provider]
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # a CUDA provider that cannot load is reported in `skipped`, not logged
    try:
        session = onnxruntime.InferenceSession(path, options, providers=providers)
    except Exception as error:
        if device == "cuda":  # the provider is listed but cannot start (no GPU, missing CUDA libraries)
            return None, device, f"{provider} failed to start: {first_line(error)}"
        raise ExportError(f"ONNX Runtime cannot load {path}: {first_line(error)}") from None
    if provider not in session.get_providers():
        return None, device, f"{provider} is listed but the session fell back to {session.get_providers()}"

    def run(input_ids, attention_mask):
        feeds = {INPUT_NAMES[0]: input_ids.numpy(), INPUT_NAMES[1]: attention_mask.numpy()}
        return [torch.from_numpy(output) for output in session.run(None, feeds)]

    return run, device, ""


@contextlib.contextmanager
def tf32_matmuls(enabled: bool):
    """Eager and TorchScript CUDA matmuls in TF32 (enabled) or strict fp32, to compare like with like;
    restores the previous setting."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def compare(
    runner, eager, spec, input_ids, attention_mask, runtime, device, dtype, atol
) -> VerificationRow:
    row = VerificationRow(runtime.split("-")[0], device, tuple(input_ids.shape), dtype)
    with torch.no_grad(), tf32_matmuls(False):
        expected = [tensor.cpu() for tensor in eager(input_ids.to(device), attention_mask.to(device))]
    try:
        actual = [tensor.cpu() for tensor in runner(input_ids, attention_mask)]
    except Exception as error:  # a runtime that cannot run a shape fails that row, with its reason
        row.note = f"runtime error: {first_line(error)}"
        return row
    outputs = len(spec.output_names)
    mismatch = shape_mismatch(spec.output_names, expected[:outputs], actual[:outputs])
    if mismatch:
        row.note = mismatch
        return row
    keep = attention_mask.bool()
    row.max_abs, scale = output_error(spec, expected, actual, keep)
    row.max_rel = row.max_abs / scale if scale > 0 else row.max_abs
    if atol is not None:
        row.tolerance = atol
    elif dtype == "fp16":
        row.tolerance = FP16_RELATIVE_TOLERANCE * max(1.0, scale)
    else:
        row.tolerance = spec.atol
    row.passed = row.max_abs <= row.tolerance  # False for NaN
    if len(actual) > outputs:
        count_bucket_flips(row, expected[outputs:], actual[outputs:], keep)
    row.note = explain(row)
    return row


def shape_mismatch(names, expected, actual) -> str:
    if len(actual) < len(names):
        return f"the graph returns {len(actual)} outputs, the spec names {len(names)}"
    for name, want, got in zip(names, expected, actual):
        if got.shape != want.shape:
            return f"{name} has shape {tuple(got.shape)}, eager {tuple(want.shape)}"
    return ""


def output_error(spec: TaskSpec, expected, actual, keep) -> tuple[float, float]:
    """Max abs error over every output (NaN if any runtime value is NaN where eager's is not) and the largest
    eager magnitude, both at the positions `keep` (B, L) selects in per-position outputs."""
    max_abs, scale = 0.0, 0.0
    for name, want, got in zip(spec.output_names, expected, actual):
        want, got = want.double(), got.double()
        if spec.per_position(name):
            want, got = want[keep], got[keep]
        if want.numel():
            error = (want - got).abs().max().item()
            max_abs = error if error != error else max(max_abs, error)  # NaN stays NaN
            scale = max(scale, want.abs().max().item())
    return max_abs, scale


def count_bucket_flips(row: VerificationRow, expected, actual, keep) -> None:
    """Bucket assignments (B, H, N, L per LSH layer) that differ from eager at kept positions."""
    flips = []
    for want, got in zip(expected, actual):
        kept = keep[:, None, None, :].expand_as(want)
        flips.append((int((got != want)[kept].sum()), int(kept.sum())))
    row.first_layer_flipped, row.first_layer_total = flips[0]
    row.flipped_buckets = sum(flipped for flipped, _ in flips)
    row.total_buckets = sum(total for _, total in flips)
    row.bucket_agreement = 1 - row.flipped_buckets / row.total_buckets if row.total_buckets else 1.0


def explain(row: VerificationRow) -> str:
    flips = f"{row.flipped_buckets} of {row.total_buckets} bucket assignments flipped"
    if row.max_abs != row.max_abs:
        return "runtime output holds NaN"
    if row.passed:
        return f"{flips} (LSH near-ties), outputs still within tolerance" if row.flipped_buckets else ""
    if row.bucket_agreement is None:
        return "outputs differ; the graph has no bucket outputs to tell LSH flips from a numeric error"
    first = f"{row.first_layer_flipped} of {row.first_layer_total} in the first LSH layer"
    if row.first_layer_flipped > max(1.0, NEAR_TIE_FRACTION * row.first_layer_total):
        return f"outputs differ; {flips}, {first}: too many for near-ties, the hashed vectors differ"
    if row.flipped_buckets:
        return f"outputs differ because {flips} (LSH hashing near-ties; {first})"
    return "outputs differ although every bucket agrees: a real numeric difference"

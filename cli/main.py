"""`reformer-export`: parse options, call exporters.api.run_export, print progress and a summary table.

The options' choices come from exporters.choices and exporters.formats, which import no torch; torch and the
exporters themselves are imported only when the command runs, so `--help` answers at once. Ctrl-C and
SIGTERM end an export with one `Error:` line and exit status 128 + the signal's number (130, 143), as a
shell reports a process the signal ended; the export's staging folder is removed either way."""

from __future__ import annotations

import contextlib
import signal

import click

from exporters.choices import (
    BUILT_IN_MODELS,
    CUSTOM_OPS_MODES,
    DEFAULT_CUSTOM_OPS,
    DEFAULT_MODEL,
    DEFAULT_OPSET,
    DEFAULT_TRITON_BACKEND,
    DEVICES,
    DTYPES,
    QUANTIZATIONS,
    SUPPORTED_OPSETS,
    TASK_NAMES,
    TRITON_BACKENDS,
)
from exporters.formats import FORMATS
from reformer.messages import first_line


def either(names: list[str]) -> str:
    """The names as `a, b or c`, for help texts."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


FILE_SUFFIXES = [entry.suffix for entry in FORMATS.values() if entry.suffix]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model", metavar="PATH_OR_NAME", default=None,
              help="Checkpoint directory (config.json + model.safetensors or pytorch_model.bin, as transformers' "
                   f"save_pretrained writes it) or a built-in model from models/ ({', '.join(BUILT_IN_MODELS)}). "
                   f"Default: {DEFAULT_MODEL}.")
@click.option("--task", type=click.Choice(TASK_NAMES), default=None,
              help="Head to export. Default: the checkpoint's architectures entry; without one, causal-lm for a "
                   "causal model (is_decoder) and base otherwise. causal-lm-with-past writes a directory with the "
                   "prefill and decoder-step graphs for generation with a cache (reformer.runtime.OnnxGenerator).")
@click.option("--format", "format_", type=click.Choice(tuple(FORMATS)), required=True,
              help=either([f"{name} ({entry.description})" for name, entry in FORMATS.items()]) + ".")
@click.option("--output", type=click.Path(dir_okay=False), default=None,
              help="Where to write the graph (a new directory for causal-lm-with-past and for triton). Default: "
                   f"<model>-<task>{either(FILE_SUFFIXES)} (a <model>-causal-lm-with-past or <model>-triton "
                   "directory) in the current directory.")
@click.option("--triton-backend", type=click.Choice(tuple(TRITON_BACKENDS)), default=None,
              help="Triton backend of the repository (--format triton only): python (the ONNX graph through "
                   "reformer.runtime; request checks, generation), onnxruntime or pytorch (TorchScript). "
                   f"Default: {DEFAULT_TRITON_BACKEND}.")
@click.option("--opset", type=click.IntRange(SUPPORTED_OPSETS[0], SUPPORTED_OPSETS[-1]), default=None,
              help=f"ONNX opset, {SUPPORTED_OPSETS[0]} to {SUPPORTED_OPSETS[-1]} (--format onnx only). "
                   f"Default: {DEFAULT_OPSET}.")
@click.option("--dtype", type=click.Choice(tuple(DTYPES)), default="fp32", show_default=True,
              help="Precision of the exported graph; fp16 needs --device cuda. causal-lm-with-past exports fp32.")
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True,
              help="Device the graph is exported and verified on. causal-lm-with-past exports on the CPU (its "
                   "graphs run on CUDA too).")
@click.option("--max-length", type=click.IntRange(min=1), default=None,
              help="Longest sequence the graph must serve. Default: the model's max_position_embeddings.")
@click.option("--custom-ops", type=click.Choice(CUSTOM_OPS_MODES), default=None,
              help="ONNX lowering of the custom ops: standard ONNX ops only, ONNX Runtime-specialised ones "
                   "(contrib MultiHeadAttention, float sort keys), onnx-attention (standard ops with the chunk "
                   "attention as ONNX's Attention op; needs --opset 23), or auto: each op's choice measured on ONNX "
                   f"Runtime (--format onnx only). Default: {DEFAULT_CUSTOM_OPS}.")
@click.option("--quantize", type=click.Choice(QUANTIZATIONS), default=None,
              help="int8: dynamic int8 weights and activations for ONNX Runtime on the CPU (ONNX graphs only, "
                   "fp32 CPU exports), verified by task: bits per token and top-1 agreement for LM heads, argmax "
                   "agreement and relative error for the others (see the README). Default: none (fp32).")
@click.option("--atol", type=float, default=None,
              help="Absolute tolerance for the replayed outputs (max abs difference from eager with eager's LSH "
                   "buckets forced; --verify only). Default: 1e-5 (fp32) or 1e-2 (fp16) of the output scale.")
@click.option("--with-buckets", is_flag=True,
              help="Also output each LSH layer's bucket assignments (buckets_0, ...), to compare runtimes' hashing; "
                   "deployment graphs need none (verification uses its own twin of the graph).")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Run the exported graph on the runtimes present and compare it with eager PyTorch.")
@click.option("--keep-failed", is_flag=True,
              help="Keep the output even when verification fails (it is removed otherwise; --verify only).")
@click.option("--native-isa", is_flag=True,
              help="Build the package for this machine's CPU instruction set (e.g. AVX-512) instead of the portable "
                   "x86-64-v3 (AVX2), which runs on any x86-64 CPU with AVX2 (--format aoti only).")
@click.option("--report", type=click.Path(dir_okay=False), default=None,
              help="Also write the summary, every verification row and the versions of the libraries used as "
                   "JSON to this file.")
def main(model, task, format_, output, opset, dtype, device, max_length, custom_ops, quantize, atol, with_buckets,
         verify, keep_failed, native_isa, report, triton_backend):
    """Export a Reformer model to ONNX, an AOTInductor package, TorchScript or a Triton model repository and
    verify it against eager PyTorch.

    Example: reformer-export --format onnx   (exports the built-in byte-lm model)"""
    try:
        with terminate_as_interrupt():
            result = export(model=model, task=task, format=format_, output=output, opset=opset, dtype=dtype,
                            device=device, max_length=max_length, custom_ops=custom_ops, atol=atol,
                            with_buckets=with_buckets, verify=verify, keep_failed=keep_failed, report=report,
                            native_isa=native_isa, triton_backend=triton_backend, quantize=quantize)
    except KeyboardInterrupt as interrupt:
        signum = signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT
        error = click.ClickException(f"interrupted by {signal.Signals(signum).name}")
        error.exit_code = 128 + signum  # the shell's convention for a process ended by a signal
        raise error from None
    click.echo(result.summary_table())
    if not result.passed:
        kept = f"kept at {result.output} (--keep-failed)" if result.output else "output file removed"
        raise click.ClickException(f"verification failed: {result.verification.failure_message()} ({kept})")


def export(**options):
    """exporters.api.run_export with progress on stderr; the library's errors become one `Error:` line."""
    quiet_dependencies()
    from exporters.api import ExportRequest, run_export
    from exporters.errors import ExportError
    from reformer import CheckpointError, ConfigError

    try:
        return run_export(ExportRequest(**options), progress=lambda message: click.echo(f"{message} ...", err=True))
    except (ExportError, CheckpointError, ConfigError, OSError) as error:
        raise click.ClickException(first_line(error)) from None


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the export is, so that it unwinds and cleans up as on Ctrl-C."""


@contextlib.contextmanager
def terminate_as_interrupt():
    """SIGTERM raises Terminated while the export runs, so that its staging folder is removed as on Ctrl-C
    (the default SIGTERM action kills the process before any cleanup)."""
    def terminate(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def quiet_dependencies() -> None:
    """Silence the exporters' and runtimes' own chatter (missing torchvision ops, deprecations inside torch,
    ONNX Runtime's log of a CUDA provider it cannot load): the summary table reports what matters, including
    each runtime that was skipped and why."""
    import logging
    import warnings

    import torch  # noqa: F401  (first: importing torch configures its loggers)

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        import onnxruntime
    except ImportError:
        return
    onnxruntime.set_default_logger_severity(4)  # fatal only


if __name__ == "__main__":
    main()

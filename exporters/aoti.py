"""AOTInductor packages (`.pt2`) for C++ and Python hosts that link libtorch: torch.export of the task's export
wrapper with a dynamic batch and sequence (exporters.program, as for ONNX), compiled ahead of time by Inductor
into a shared library inside a zip archive. The successor of the TorchScript file (exporters/torchscript.py),
which torch deprecates.

Files
    <model>-<task>.pt2      a task graph: one model, named "model" (the loaders' default)
    <folder>/decoder.pt2    task causal-lm-with-past (exporters/decoder.py): two models, "prefill" and "step",
                            beside decoder_config.json

Loading
    C++:    torch::inductor::AOTIModelPackageLoader loader(path);            // model "model"
            torch::inductor::AOTIModelPackageLoader step(path, "step");      // a decoder package's step
            std::vector<at::Tensor> outputs = loader.run(inputs);
    Python: load_package(path[, model_name]) here (torch._inductor.package.load_package, quiet about a portable
            instruction set), or torch._inductor.aoti_load_package(path) for "model".

Calling convention (flat tensor lists, on the package's device: metadata AOTI_DEVICE_KEY)
    task graph:   inputs input_ids, attention_mask, int64 [batch, sequence], 1 <= batch <= 4096,
                  1 <= sequence <= max_length; outputs as the description's output_names (the task's outputs,
                  then with_buckets each LSH layer's buckets int64 [batch, heads, rounds, sequence]).
                  A verification twin (never shipped) takes each LSH layer's forced buckets after the mask.
    prefill:      input_ids [batch, P] -> logits, then the cache tensors (decoder_config.json "prefill").
    step:         input_ids [batch, 1], then the past cache tensors -> logits, then the present cache tensors
                  (decoder_config.json "step"); see exporters/decoder.py for the cache layout.
    Batch 1 and length 1 are served: torch.export and the compile both reason size-obliviously
    (exporters.program.size_oblivious; torch's 0/1 specialisation would raise the lower bounds to 2 or more),
    and the tests compare batch 1, length 1 and one-chunk lengths with eager. The package checks no input
    shape unless the environment sets AOTI_RUNTIME_CHECK_INPUTS=1 (then it refuses a batch above 4096 or a
    sequence above max_length): a host must refuse longer sequences itself, as it does for TorchScript.

Metadata: string keys to string values, read with AOTIModelPackageLoader::get_metadata() (or the static
AOTIModelPackageLoader::load_metadata_from_package(path, model_name), which loads no library), and in Python
with package_metadata / load_metadata here:
    "reformer_export.json"  (METADATA_NAME) in a task graph: the JSON description the TorchScript file carries
                            as its extra file of that name (exporters.specs.embedded_description: task, input
                            and output names, hash seed, max_length, padding_multiple, dtype, with_buckets,
                            format "aoti", dynamic_axes, device, torch_version, config), plus export_shape (the
                            example's [batch, sequence]), cpu_march (the compiler's target, CPU_TARGETS) and
                            program_ops (the exported program's operator counts, which verification compares
                            with the twin's)
    "decoder_config.json"   (reformer.sampling.DECODER_CONFIG_NAME) in both models of decoder.pt2: the content of the
                            decoder_config.json beside it
    Inductor's own: "AOTI_DEVICE_KEY" ("cpu" or "cuda"), "AOTI_CPU_ISA" (the vector instruction set of the CPU
                            kernels, e.g. "AVX2"), "AOTI_PLATFORM", "AOTI_MACHINE", "AOTI_COMPUTE_CAPABILITY".

Instruction set: Inductor compiles for the build machine (-march=native, and its widest vector ISA, e.g.
AVX-512 with AMX), and such a library dies with SIGILL on an older CPU (pytorch/pytorch#121516). By default the
package targets x86-64-v3 (AVX2, FMA, F16C: every x86-64 server CPU since 2013-2015, and the level of ATen's
own AVX2 kernels) with 256-bit vectors, so it runs on any CPU with AVX2; `native_isa` builds for this machine's
own instruction set instead (faster kernels here, nowhere else). A CUDA package holds host code too (the C++
wrapper that launches the kernels), so the same choice applies to it."""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import platform
import time
import zipfile

import torch
import torch._inductor
from torch import nn

from reformer.files import atomic_write
from reformer.sampling import DECODER_CONFIG_NAME

from .decoder_graphs import GRAPHS, graph_modules
from .errors import ExportError, first_line
from .precision import model_as
from .program import export_graph, export_program, size_oblivious
from .runners import module_runner
from .specs import TaskSpec, embedded_description, resolve_max_length, wrapper_example_inputs
from .torchscript import METADATA_NAME

SUFFIX = ".pt2"
MODEL_NAME = "model"  # the name AOTIModelPackageLoader and aoti_load_package load by default
# cpu_march values and their Inductor options: the compiler's -march and Inductor's vector width (cpp.simdlen,
# bits); native keeps Inductor's defaults (-march=native and this CPU's widest vector ISA).
PORTABLE_MARCH = "x86-64-v3"
NATIVE_MARCH = "native"
CPU_TARGETS = {PORTABLE_MARCH: {"cpp.march": PORTABLE_MARCH, "cpp.simdlen": 256}, NATIVE_MARCH: {}}
X86_MACHINES = ("x86_64", "AMD64")
# torch logs this when a package's recorded ISA is not this machine's widest (torch.export.pt2_archive).
ISA_MISMATCH_LOGGER = "torch.export.pt2_archive._package"


def export_aoti(
    model: nn.Module,
    spec: TaskSpec,
    path: str,
    *,
    dtype: str = "fp32",
    device: str = "cpu",
    with_buckets: bool = False,
    replay: bool = False,
    max_length: int | None = None,
    metadata: dict | None = None,
    native_isa: bool = False,
) -> dict[str, float]:
    """torch.export `spec.wrap(model, with_buckets)` with a dynamic batch (1 to 4096) and sequence (1 to
    max_length, default max_position_embeddings), compile it with AOTInductor for `device` and write the
    package atomically to path (ending in .pt2), with the JSON description (plus `metadata`) under the metadata
    key METADATA_NAME (see the module docstring). `replay` exports the verification twin instead
    (exporters.specs.ExportWrapper). `native_isa`: build for this machine's instruction set rather than the
    portable one. The caller's model is not changed. Returns the seconds of each step: export, compile. Raises
    ExportError with a one-line message; leaves nothing at path on failure."""
    check_package_path(path)
    config = model.config
    max_length = resolve_max_length(config, max_length)
    march = cpu_march(native_isa)
    wrapper = spec.wrap(model_as(model, dtype, device), with_buckets, replay).eval()
    example = wrapper_example_inputs(wrapper, config, max_length, device)
    timer = time.perf_counter()
    try:
        program = export_program(wrapper, example, max_length)
    except Exception as error:  # torch.export raises many kinds; the caller needs one, with the reason
        raise ExportError(f"torch.export failed: {type(error).__name__}: {first_line(error)}") from error
    seconds = {"export": time.perf_counter() - timer}
    description = embedded_description(config, spec, wrapper, "aoti", max_length=max_length, dtype=dtype,
                                       device=device)
    description.update(export_shape=list(example[0].shape), cpu_march=march, program_ops=program_ops(program),
                       **(metadata or {}))
    timer = time.perf_counter()
    compile_package(path, {MODEL_NAME: program}, {METADATA_NAME: json.dumps(description, indent=2, sort_keys=True)},
                    march)
    seconds["compile"] = time.perf_counter() - timer
    return seconds


def check_package_path(path: str) -> None:
    """torch's packager writes archives named *.pt2 only; refuse other names before any slow step."""
    if not str(path).endswith(SUFFIX):
        raise ExportError(f"an AOTInductor package's name must end in {SUFFIX}, got {path}")


def require_compiler() -> None:
    """AOTInductor compiles C++: raise ExportError, before any slow step, when Inductor finds no C++ compiler."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as error:  # Inductor's own error type for a missing compiler is private
        raise ExportError(f"an AOTInductor package is compiled C++, and no C++ compiler was found "
                          f"({first_line(error)}): install g++, or name one in CXX") from None


def cpu_march(native_isa: bool) -> str:
    """The CPU_TARGETS entry to build for: the portable one on x86-64, this machine's own with `native_isa`."""
    if native_isa:
        return NATIVE_MARCH
    if platform.machine() not in X86_MACHINES:
        raise ExportError(f"the portable instruction set ({PORTABLE_MARCH}) is for x86-64 machines, this is "
                          f"{platform.machine()}: build for this machine's own with --native-isa")
    if not hasattr(torch._inductor.config.cpp, "march"):  # torch 2.11 has no such option; 2.13 has
        raise ExportError(f"this torch ({torch.__version__}) cannot choose the compiler's target, so its packages "
                          "need this machine's instruction set: build with --native-isa, or use torch 2.13")
    return PORTABLE_MARCH


def compile_package(path: str, programs: dict[str, torch.export.ExportedProgram], metadata: dict[str, str],
                    march: str) -> None:
    """AOTInductor-compile each program (for the device its example inputs are on) and write them atomically as
    one package at path, each under its name, each with `metadata` (string to string) next to Inductor's own."""
    compiled = {}
    for name, program in programs.items():
        options = {"aot_inductor.package": True,
                   # Inductor adds its device keys to this dict: one fresh copy per model.
                   "aot_inductor.metadata": dict(metadata),
                   # Inductor's lower bounds on the sizes (batch >= 2, more than one chunk) come from guards it
                   # records but ignores (strides of size-1 dimensions, views of a single chunk): its code gives
                   # eager's values at batch 1, length 1 and one chunk (tests/exporters/test_aoti.py). Without
                   # this, a host that sets AOTI_RUNTIME_CHECK_INPUTS=1 would be refused those sizes; the upper
                   # bounds are still checked.
                   "aot_inductor.check_lowerbound": False,
                   **CPU_TARGETS[march]}
        args, kwargs = program.example_inputs
        try:
            with size_oblivious():  # else the package would assume batch >= 2, and more (see size_oblivious)
                compiled[name] = torch._inductor.aot_compile(program.module(check_guards=False), args, kwargs,
                                                             options=options)
        except Exception as error:  # Inductor and the C++ compiler raise many kinds; one, with the reason
            raise ExportError(f"AOTInductor compilation of {name} failed: {type(error).__name__}: "
                              f"{first_line(error)}") from error
    from torch._inductor.package import package_aoti

    atomic_write(path, lambda temporary: package_aoti(temporary, compiled))


def program_ops(program: torch.export.ExportedProgram) -> dict[str, int]:
    """How often each operator occurs in the exported program's graph."""
    names = (str(node.target) if isinstance(node.target, torch._ops.OpOverload) else node.target.__name__
             for node in program.graph.nodes if node.op == "call_function")
    return dict(sorted(collections.Counter(names).items()))


def package_metadata(path: str, model_name: str = MODEL_NAME) -> dict[str, str]:
    """Every metadata entry of one model of the package (see the module docstring), without loading it: through
    torch's reader where it has one, else (torch 2.11) from the archive's `<model>/...wrapper_metadata.json`,
    where packages of both versions keep it."""
    try:
        loader = torch._C._aoti.AOTIModelPackageLoader
        if hasattr(loader, "load_metadata_from_package"):
            return dict(loader.load_metadata_from_package(str(path), model_name))
        with zipfile.ZipFile(path) as archive:
            member = next(name for name in archive.namelist()
                          if f"/data/aotinductor/{model_name}/" in name and name.endswith("wrapper_metadata.json"))
            return json.loads(archive.read(member))
    except Exception as error:  # a file that is not a package, or lacks the model
        raise ExportError(f"cannot read the metadata of {model_name} in {path}: {first_line(error)}") from None


def load_metadata(path: str) -> dict:
    """The JSON description export_aoti embedded in the package at path."""
    metadata = package_metadata(path)
    if METADATA_NAME not in metadata:
        raise ExportError(f"{path} holds no {METADATA_NAME}: not a reformer-export task graph")
    return json.loads(metadata[METADATA_NAME])


def load_package(path: str, model_name: str = MODEL_NAME):
    """torch._inductor.package.load_package: a callable taking the model's inputs (see the module docstring).
    torch logs a warning whenever a package's CPU ISA is not this machine's widest; a portable package that
    this machine runs is expected, and that warning is dropped (any other mismatch is still logged)."""
    from torch._inductor.package import load_package as load

    with runnable_isa_mismatch_dropped():
        return load(str(path), model_name)


class RunnableIsaMismatchFilter(logging.Filter):
    """Drops torch's "Device information mismatch for AOTI_CPU_ISA" record when the package's ISA is one
    this CPU runs (a portable package on a newer CPU)."""

    def filter(self, record: logging.LogRecord) -> bool:
        arguments = record.args if isinstance(record.args, tuple) else ()
        if not (record.msg.startswith("Device information mismatch") and len(arguments) == 3
                and arguments[0] == "AOTI_CPU_ISA"):
            return True
        from torch._inductor.cpu_vec_isa import valid_vec_isa_list

        runnable = {str(isa).upper() for isa in valid_vec_isa_list()} | {"INVALID_VEC_ISA"}  # scalar code
        return str(arguments[2]) not in runnable


@contextlib.contextmanager
def runnable_isa_mismatch_dropped():
    logger, dropped = logging.getLogger(ISA_MISMATCH_LOGGER), RunnableIsaMismatchFilter()
    logger.addFilter(dropped)
    try:
        yield
    finally:
        logger.removeFilter(dropped)


def export_decoder(decoder, specs: dict, folder: str, description: dict, *, native_isa: bool = False) -> None:
    """The prefill and step graphs of causal-lm-with-past (exporters.decoder_graphs: `specs` their axes and
    example inputs) as the models "prefill"
    and "step" of one package (description["files"]["package"]), each with decoder_config.json's content (the
    description, which gains cpu_march here) as metadata."""
    march = description["cpu_march"] = cpu_march(native_isa)
    programs = {}
    for name, module in graph_modules(decoder).items():
        try:
            programs[name] = export_graph(module, specs[name])
        except Exception as error:  # torch.export raises many kinds; the caller needs one, with the reason
            raise ExportError(f"torch.export of the {name} graph failed: {first_line(error)}") from error
    compile_package(os.path.join(folder, description["files"]["package"]), programs,
                    {DECODER_CONFIG_NAME: json.dumps(description, indent=2, sort_keys=True)}, march)


def decoder_callables(folder: str, files: dict[str, str]) -> dict:
    """{"prefill" | "step": the package's model of that name} (export_decoder's package in folder), on the CPU."""
    path = os.path.join(folder, files["package"])
    return {kind: load_package(path, kind) for kind in GRAPHS}


def node_kinds(path: str) -> collections.Counter:
    """The compiled package holds no graph: its description counts the exported program's ops."""
    return collections.Counter(load_metadata(path)["program_ops"])


def open_runner(path: str, device: str, tf32: bool = False) -> tuple:
    """(exporters.runners.Runner, "") over the package at path on device, or (None, why not): a package runs on
    the device it was compiled for only."""
    if device == "cuda" and not torch.cuda.is_available():
        return None, "torch sees no CUDA device"
    compiled_for = package_metadata(path)["AOTI_DEVICE_KEY"]
    if compiled_for != device:
        return None, f"the package is compiled for {compiled_for}"
    try:
        package = load_package(path)
    except Exception as error:  # a package torch cannot load is a failed verification, not a crash
        raise ExportError(f"cannot load AOTInductor package {path}: {first_line(error)}") from None
    return module_runner(package, device, tf32), ""

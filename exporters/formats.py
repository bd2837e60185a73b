"""The export formats, one entry each in FORMATS, importable without torch so that `reformer-export --help`
offers them at once. An entry knows its name, file suffix and description, and does for exporters.api what
is particular to its format: the checks of its options (and their refusal in requests for other formats), the
settings it adds, their words in the summary, the export of a task graph and of the causal-lm-with-past graphs
through its exporter module (imported only then), the file names of the latter, how its files open as
exporters.runners.Runner for the verifier, and their node kinds.

The graph formats (GraphFormat) are onnx, aoti and torchscript (exporters/onnx.py, aoti.py, torchscript.py);
triton (TritonRepository) is a layout over one of them: the graph its backend serves is exported and verified
as for that format, then laid out as a model repository (exporters/triton/layout.py). A new graph format is
its exporter module and an entry here."""

from __future__ import annotations

import collections
import importlib
from abc import ABC
from dataclasses import dataclass
from typing import Callable

from .choices import (
    CUSTOM_OPS_MODES,
    DEFAULT_CUSTOM_OPS,
    DEFAULT_OPSET,
    DEVICES,
    GENERATION_TASK,
    QUANTIZATIONS,
    SUPPORTED_OPSETS,
    TRITON_BACKENDS,
)
from .errors import ExportError, ExportRequestError
from .request import ExportRequest


@dataclass(frozen=True)
class Format:
    name: str
    suffix: str  # of a task graph's file; "" for a format that writes a directory
    description: str  # one line, for --help

    def graph_format(self, request: ExportRequest) -> str:
        """The format of the graphs a request in this format exports (checking what decides it)."""
        return self.name

    def check(self, request: ExportRequest, graph_format: str) -> None:
        """Refuse this format's own options (the ExportRequest fields for it only) in a request for another
        format, check them in one for this format: none unless overridden. graph_format is the format of the
        request's graphs (a layout's is another); exporters.api.check_options asks every entry."""

    def summary(self, settings: dict) -> str:
        """This format's settings (exporters.api.applied_settings) as the summary's export line adds them."""
        return ""


class GraphFormat(Format, ABC):
    """A format whose exporter writes a task graph (and the verification twin) from exporters.models'
    ResolvedModel, and whose graphs exporters.decoder writes for causal-lm-with-past."""

    module_name = ""  # the exporter module (see exporter_module)
    exporter_name = ""  # its task graph exporter (see exporter)
    decoder_files: dict[str, str] = {}  # the causal-lm-with-past graphs' files (decoder_config.json's "files")
    quantizable = False  # whether --quantize applies (exporters.quantize)

    @property
    def runtime(self) -> str:
        """What runs this format's graphs, as verification reports name it."""
        return self.name

    @property
    def runtimes(self) -> tuple[str, ...]:
        """The runtimes exporters.verify can run this format's graphs on, one per device: `runtime-device`."""
        return tuple(f"{self.runtime}-{device}" for device in DEVICES)

    def exporter_module(self):
        """The format's exporter module, imported now (it imports torch): module_name, relative to this package.
        Besides its exporter it has open_runner(path, device, tf32) (onnx's takes its session options too),
        node_kinds(path), export_decoder(decoder, specs, folder, description, **options) and
        decoder_callables(folder, decoder_files)."""
        return importlib.import_module(self.module_name, __package__)

    def open_runner(self, path: str, device: str, tf32: bool = False) -> tuple:
        """(exporters.runners.Runner, "") over the graph at path on device, or (None, why it cannot run here)."""
        return self.exporter_module().open_runner(path, device, tf32)

    def node_kinds(self, path: str) -> collections.Counter:
        """How many nodes of each kind the graph at path has (exporters.twin_difference)."""
        return self.exporter_module().node_kinds(path)

    def export_decoder(self, decoder, specs: dict, folder: str, description: dict, **options) -> None:
        """The prefill and step graphs of the reformer.generation.IncrementalDecoder, as their specs say
        (exporters.decoder_graphs.decoder_specs), into folder, under the names in description["files"]; `options`
        are exporter_options'. The description (decoder_config.json) may gain entries."""
        self.exporter_module().export_decoder(decoder, specs, folder, description, **options)

    def decoder_runners(self, folder: str) -> dict:
        """The prefill and step graphs that export_decoder wrote into folder, as Runners on the CPU:
        {"prefill" | "step": [input_ids, *past] -> [logits, *present]}."""
        from .runners import callable_runner

        callables = self.exporter_module().decoder_callables(folder, self.decoder_files)
        return {kind: callable_runner(call, "cpu") for kind, call in callables.items()}

    def settings(self, request: ExportRequest) -> dict:
        """The settings this format adds to the common ones (exporters.api.applied_settings)."""
        return {}

    def require(self, request: ExportRequest) -> None:
        """Raise ExportError when this machine lacks what exporting in this format needs, before any slow step
        (the runtime that verifies it: exporters.runtimes)."""

    def exporter_options(self, settings: dict) -> dict:
        """This format's keyword arguments of its exporter and of exporters.decoder's, from its settings."""
        return {}

    def exporter(self) -> Callable:
        """The exporter function: (model, spec, path, *, dtype, device, max_length, with_buckets, replay,
        metadata, **exporter_options) -> the seconds of each step, or None for one step."""
        return getattr(self.exporter_module(), self.exporter_name)

    def export(self, settings: dict, resolved, path: str, replay: bool = False) -> dict[str, float]:
        """The task graph `settings` describe, of the exporters.models.ResolvedModel `resolved`, or (`replay`)
        its verification twin, written to path. Returns the seconds of each step where the exporter has
        several (aoti: export, compile), else {}."""
        return self.exporter()(resolved.model, resolved.spec, path, dtype=settings["dtype"],
                               device=settings["device"], max_length=settings["max_length"],
                               with_buckets=settings.get("with_buckets", False), replay=replay,
                               metadata=resolved.graph_metadata(), **self.exporter_options(settings)) or {}


class OnnxFormat(GraphFormat):
    module_name, exporter_name = ".onnx", "export_onnx"
    decoder_files = {"prefill": "prefill.onnx", "step": "decoder_step.onnx"}
    quantizable = True

    @property
    def runtime(self) -> str:
        return "onnxruntime"

    def open_runner(self, path: str, device: str, tf32: bool = False, threads: int | None = None,
                    keep_arena: bool = False) -> tuple:
        """As every graph format's, with ONNX Runtime's session options: intra-op `threads` (None: one per core)
        and `keep_arena` (exporters.onnx.open_runner); the benchmarks set them."""
        return self.exporter_module().open_runner(path, device, tf32, threads, keep_arena)

    def require(self, request: ExportRequest) -> None:
        if request.verify:
            from .runtimes import require_onnxruntime

            require_onnxruntime()

    def settings(self, request: ExportRequest) -> dict:
        return {"opset": DEFAULT_OPSET if request.opset is None else request.opset,
                "custom_ops": request.custom_ops or DEFAULT_CUSTOM_OPS}

    def summary(self, settings: dict) -> str:
        return f", opset {settings['opset']}, custom ops {settings['custom_ops']}"

    def check(self, request: ExportRequest, graph_format: str) -> None:
        if request.custom_ops is not None and request.custom_ops not in CUSTOM_OPS_MODES:
            raise ExportRequestError(f"unknown custom ops {request.custom_ops!r}: "
                                     f"choose one of {', '.join(CUSTOM_OPS_MODES)}")
        if graph_format == self.name and request.custom_ops is not None:
            from .ops import check_mode

            try:
                check_mode(request.custom_ops, DEFAULT_OPSET if request.opset is None else request.opset)
            except ValueError as error:
                raise ExportRequestError(str(error)) from None
        if graph_format != self.name:
            for option, value in (("--opset", request.opset), ("--custom-ops", request.custom_ops)):
                if value is not None:
                    raise ExportRequestError(f"{option} applies to ONNX only: drop it for {graph_format} graphs")
        elif request.opset is not None and request.opset not in SUPPORTED_OPSETS:
            raise ExportRequestError(f"opset {request.opset} is not supported: choose {SUPPORTED_OPSETS[0]} to "
                                     f"{SUPPORTED_OPSETS[-1]}")
        if request.quantize is not None:
            self.check_quantization(request, graph_format)

    def check_quantization(self, request: ExportRequest, graph_format: str) -> None:
        if request.quantize not in QUANTIZATIONS:
            raise ExportRequestError(f"unknown quantization {request.quantize!r}: choose {', '.join(QUANTIZATIONS)}")
        if graph_format != self.name:
            raise ExportRequestError(f"--quantize applies to ONNX graphs only: drop it for {graph_format} graphs")
        if request.device != "cpu" or request.dtype != "fp32":
            raise ExportRequestError(f"--quantize {request.quantize} makes graphs for ONNX Runtime on the CPU from "
                                     "fp32: drop --device and --dtype")
        from .quantize import onnxruntime_distribution

        try:
            onnxruntime_distribution()
        except ExportError as error:
            raise ExportRequestError(str(error)) from None

    def exporter_options(self, settings: dict) -> dict:
        return {"opset": settings["opset"], "custom_ops": settings["custom_ops"]}

    def export(self, settings: dict, resolved, path: str, replay: bool = False) -> dict[str, float]:
        """As for every graph format, through a scratch fp32 graph quantized into path where settings ask: by
        settings' quantize_recipe where given (the verification twin takes its graph's), else by the recipe an
        LM head's held-out text chooses (exporters.quantize.quantized_into)."""
        from .quantize import quantized_into
        from .task_verdict import LM_TASKS

        quantize, recipe = settings.get("quantize"), settings.get("quantize_recipe")
        held_out = None
        if quantize and recipe is None and resolved.spec.name in LM_TASKS:
            held_out = resolved.held_out_windows(settings["max_length"])
        with quantized_into(path, quantize, held_out, recipe) as fp32_path:
            return super().export(settings, resolved, fp32_path, replay)


class AotiFormat(GraphFormat):
    module_name, exporter_name = ".aoti", "export_aoti"
    decoder_files = {"package": "decoder.pt2"}

    def settings(self, request: ExportRequest) -> dict:
        from .aoti import cpu_march

        return {"cpu_march": cpu_march(request.native_isa)}  # exporters.aoti.CPU_TARGETS

    def summary(self, settings: dict) -> str:
        return f", CPU target {settings['cpu_march']}"

    def check(self, request: ExportRequest, graph_format: str) -> None:
        if request.format != self.name:
            if request.native_isa:
                raise ExportRequestError(f"--native-isa applies to aoti only: drop it for --format {request.format}")
        elif request.output and request.task != GENERATION_TASK:
            from .aoti import check_package_path

            try:
                check_package_path(request.output)
            except ExportError as error:
                raise ExportRequestError(str(error)) from None

    def require(self, request: ExportRequest) -> None:
        from .aoti import cpu_march, require_compiler

        require_compiler()
        cpu_march(request.native_isa)  # refused off x86-64 without --native-isa

    def exporter_options(self, settings: dict) -> dict:
        from .aoti import NATIVE_MARCH

        return {"native_isa": settings["cpu_march"] == NATIVE_MARCH}


class TorchScriptFormat(GraphFormat):
    module_name, exporter_name = ".torchscript", "export_torchscript"
    decoder_files = {"module": "decoder.pt"}


class TritonRepository(Format):
    """A Triton Inference Server model repository around the graph of one format (TRITON_BACKENDS)."""

    def check(self, request: ExportRequest, graph_format: str) -> None:
        if request.format != self.name and request.triton_backend is not None:
            raise ExportRequestError("--triton-backend applies to --format triton only: drop it or add --format "
                                     "triton")

    def graph_format(self, request: ExportRequest) -> str:
        from .triton.layout import check_triton_options

        return check_triton_options(request.triton_backend, request.task, request.task == GENERATION_TASK)

    def summary(self, settings: dict) -> str:
        return GRAPH_FORMATS[TRITON_BACKENDS[settings["triton_backend"]]].summary(settings)


TRITON = TritonRepository("triton", "", "a Triton Inference Server model repository; serve it with reformer-serve")
GRAPH_FORMATS = {entry.name: entry for entry in (
    OnnxFormat("onnx", ".onnx", "ONNX Runtime, for apps in any language"),
    AotiFormat("aoti", ".pt2", "an AOTInductor .pt2 package for C++ and Python hosts through libtorch"),
    TorchScriptFormat("torchscript", ".pt", "a .pt for libtorch hosts; legacy: torch deprecates TorchScript"),
)}
FORMATS = {**GRAPH_FORMATS, TRITON.name: TRITON}

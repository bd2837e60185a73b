"""Export of a causal LM for generation with a cache (task `causal-lm-with-past`): a prefill graph for the
prompt and a decoder-step graph for one new token, with the cache as explicit inputs and outputs, plus
`decoder_config.json`, which tells a runtime how to drive them. Both graphs trace
`reformer.generation.IncrementalDecoder`, the code eager generation runs.

Directory layout written by `export_causal_lm_with_past(model, output_dir, fmt)`:

    decoder_config.json    format, file names, input/output names, cache tensors with dtypes, shapes and
                           padding values, token ids (eos, pad), vocab size, max_length (the longest sequence
                           the graphs serve, prompt plus new tokens), max_position_embeddings, hash seed,
                           model config, tokenizer_files (the names of those below)
    tokenizer.json, spiece.model, tokenizer_config.json, special_tokens_map.json
                           the checkpoint's tokenizer files, where it has them (exporters/tokenizer_files.py;
                           tokenizer.json may be written from spiece.model)
    onnx:        prefill.onnx, decoder_step.onnx   (the requested opset, the op registry's lowerings; ONNX
                                                   Runtime CPU and CUDA)
    aoti:        decoder.pt2                       (one AOTInductor package, models "prefill" and "step":
                                                   exporters/aoti.py; libtorch runs it in C++ and Python)
    torchscript: decoder.pt                        (torch.jit.trace, ATen ops only: libtorch runs it in C++;
                                                   legacy, torch deprecates TorchScript)

The cache, for a model with layers 0..Y-1 of which the LSH layers are i, j, ... (names as in decoder_config.json,
`past_` on step inputs, `present_` on outputs; Lp is the number of cached positions):

    states_{y}   float32 [batch, Lp, hidden_size]       every layer y: layer-normed attention input per position
    buckets_{i}  int64 [batch, heads, num_hashes, Lp]   every LSH layer i: bucket per round, no round offsets
    lsh_unchunked_until int64 [batch]                   only with LSH layers; passed through unchanged
    left_padding int64 [batch]                          positions in front of each row's first; passed through

Prefill: inputs `input_ids` int64 [batch, P] (1 <= P <= max_length; no padding: every row of a call has the
same length) -> `logits` float32 [batch, P, vocab_size], then the `present_*` cache in the order above
(Lp = P, left_padding 0). Step: inputs `input_ids` int64 [batch, 1] (the token after the cached positions), then
the `past_*` cache -> `logits` float32 [batch, 1, vocab_size], then the `present_*` cache (Lp + 1 positions).
Feed each step's present tensors back as the next step's past tensors. Lp + 1 must not exceed max_length.

Prompts of different lengths (reformer.sampling): prefill each group of equal length on its own, then give every
cache tensor with an Lp axis `longest - P` positions of its `padding_value` in front (cache_tensors in
decoder_config.json), set `left_padding` to that number, and concatenate the groups' rows; steps then run the
whole batch, each row exactly as alone.

AOTInductor (`decoder.pt2`): `torch::inductor::AOTIModelPackageLoader(path, "prefill")` and `(path, "step")`
(Python: exporters.aoti.load_package(path, "step")); `run({input_ids})` and `run({input_ids, cache...})` return
{logits, cache...}. Both models carry the decoder_config.json content under the metadata key `decoder_config.json`
(`get_metadata()`), and decoder_config.json records the CPU target as `cpu_march` (see exporters/aoti.py).

TorchScript (`decoder.pt`, for C++ hosts via torch::jit::load): `forward(input_ids)` is the prefill and returns
a tuple (logits, cache...); `step(input_ids, cache...)` returns a tuple (logits, cache...); call it as
`module.get_method("step")(inputs)` with the cache tensors as separate IValues in the order above. The
decoder_config.json content is also embedded as the extra file `decoder_config.json`.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim

from reformer.files import publish, staging_folder, write_json
from reformer.generation import DecoderCache, IncrementalDecoder, cache_layout
from reformer.sampling import PAST_LENGTH

from . import ops
from .decoder_files import CONFIG_NAME, FILES
from .decoder_verification import verify_decoder
from .errors import ExportError, VerificationError, first_line
from .precision import model_as, training_modes_kept
from .program import batch_dim, export_dynamic
from .specs import DEFAULT_OPSET, example_length, resolve_max_length
from .tokenizer_files import write_tokenizer_files


def prefill_outputs(decoder: IncrementalDecoder, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(logits, *cache tensors) of the prompt."""
    logits, cache = decoder.prefill(input_ids)
    return (logits, *cache.tensors())


def step_outputs(decoder: IncrementalDecoder, input_ids: torch.Tensor, past: tuple) -> tuple[torch.Tensor, ...]:
    """(logits, *present cache tensors) of one new token after the past cache tensors."""
    logits, cache = decoder.step(input_ids, DecoderCache.from_tensors(decoder.config, past))
    return (logits, *cache.tensors())


class StepGraph(nn.Module):
    """The decoder step as `forward`, for exporters that take one method (torch.export)."""

    def __init__(self, decoder: IncrementalDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return step_outputs(self.decoder, input_ids, past)


class DecoderGraphs(nn.Module):
    """`forward` is the prefill, `step` the decoder step: one TorchScript file for C++ hosts holds both, and
    the ONNX prefill graph is this module's `forward`."""

    def __init__(self, decoder: IncrementalDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return prefill_outputs(self.decoder, input_ids)

    def step(self, input_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return step_outputs(self.decoder, input_ids, past)


def decoder_description(config, fmt: str, max_length: int) -> dict:
    """The content of decoder_config.json (see the module docstring)."""
    layout = cache_layout(config)
    names = list(layout)
    return {
        "format": fmt,
        "files": FILES[fmt],
        "cache": names,
        "cache_tensors": layout,
        "prefill": {"inputs": ["input_ids"], "outputs": ["logits"] + [f"present_{name}" for name in names]},
        "step": {"inputs": ["input_ids"] + [f"past_{name}" for name in names],
                 "outputs": ["logits"] + [f"present_{name}" for name in names]},
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "vocab_size": config.vocab_size,
        "max_length": max_length,
        "max_position_embeddings": config.max_position_embeddings,
        "hash_seed": config.resolved_hash_seed,
        "torch_version": torch.__version__,
        "config": config.to_dict(),
    }


def example_prompt(config, max_length: int, batch: int = 2) -> torch.Tensor:
    """A prompt longer than one chunk and not a multiple of the chunk lengths (the general prefill path), short
    enough for a step after it."""
    length = example_length(config.padding_multiple, max_length - 1)
    return torch.randint(1, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))


def export_causal_lm_with_past(model, output_dir: str, fmt: str = "onnx", *, opset: int = DEFAULT_OPSET,
                               custom_ops: str = "auto", max_length: int | None = None, verify: bool = True,
                               atol: float | None = None, keep_failed: bool = False, metadata: dict | None = None,
                               native_isa: bool = False, quantize: str | None = None, held_out=None,
                               tokenizer_files: dict[str, bytes] | None = None):
    """Write the prefill and decoder-step graphs of a causal `ReformerModelWithLMHead` (fp32, CPU) and
    decoder_config.json into output_dir, which must not exist yet. max_length: the longest sequence, prompt
    plus generated tokens, the graphs must serve (2 to max_position_embeddings, the default); runtimes refuse
    longer ones. Everything is written into a staging folder beside output_dir and renamed into place at the
    end, after verification (exporters.decoder_verification.verify_decoder), so a failure leaves nothing (a
    failed verification leaves the graphs with `keep_failed`). ONNX graphs go through the op registry like the
    task graphs (`opset`, `custom_ops`); an AOTInductor package targets the portable CPU instruction set unless
    `native_isa` (exporters.aoti.cpu_march). `quantize` "int8": both ONNX graphs quantized (exporters.quantize;
    decoder_config.json records how under "quantization"), verified by their task verdict, with bits per token
    on `held_out` windows where given. `tokenizer_files` (names to contents) are written beside the graphs. The
    caller's model is left as it was (dtype, device, training mode).
    Returns (the description written to decoder_config.json plus `metadata`, the VerificationReport or None).
    Raises ExportError (VerificationError, carrying the report, when verification failed and the graphs were
    not kept)."""
    output_dir, max_length = checked_request(model, output_dir, fmt, max_length, quantize)
    with training_modes_kept(model):  # model_as puts the caller's model itself in eval mode when it needs no copy
        model = model_as(model, "fp32", "cpu")
        description = {**decoder_description(model.config, fmt, max_length), **(metadata or {}),
                       "tokenizer_files": sorted(tokenizer_files or {})}
        report = None
        with staging_folder(output_dir) as staging:
            folder = os.path.join(staging, os.path.basename(output_dir))
            os.mkdir(folder)
            write_tokenizer_files(tokenizer_files or {}, folder)
            write_graphs(IncrementalDecoder(model), folder, description, opset, custom_ops, native_isa, quantize)
            if verify:
                quantized = {} if quantize is None else {"quantized": True, "held_out": held_out}
                report = verify_decoder(model, folder, fmt, atol=atol, **quantized)
                report.path = output_dir
                if not report.passed and not keep_failed:
                    raise VerificationError(report.failure_message(), report)
            publish(folder, output_dir)
    return description, report


def checked_request(model, output_dir: str, fmt: str, max_length: int | None, quantize: str | None) -> tuple[str, int]:
    """(output_dir made absolute, max_length resolved), or ExportError saying what the request cannot have."""
    if fmt not in FILES:
        raise ExportError(f"unknown format {fmt!r}: choose one of {', '.join(FILES)}")
    if quantize is not None and fmt != "onnx":
        raise ExportError(f"quantized decoder graphs are ONNX graphs: drop the quantization for {fmt}")
    if not getattr(model.config, "is_decoder", False) or not hasattr(model, "lm_head"):
        raise ExportError("causal-lm-with-past needs a causal LM (ReformerModelWithLMHead, is_decoder true)")
    output_dir = os.path.abspath(output_dir)
    if os.path.exists(output_dir):
        raise ExportError(f"output {output_dir} already exists: give a new directory")
    parent = os.path.dirname(output_dir)
    if not os.path.isdir(parent):
        raise ExportError(f"cannot write {output_dir}: {parent} is not a directory")
    max_length = resolve_max_length(model.config, max_length)
    if max_length < 2:
        raise ExportError("causal-lm-with-past needs max_length 2 or more: a prompt token and a new one")
    return output_dir, max_length


def write_graphs(decoder: IncrementalDecoder, folder: str, description: dict, opset: int, custom_ops: str,
                 native_isa: bool, quantize: str | None) -> None:
    """The graphs of description["format"] and decoder_config.json (the description, which the exporters
    complete) into folder."""
    fmt = description["format"]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and exporter chatter; the verification is the check
        if fmt == "onnx":
            description["opset"] = opset
            description["lowerings"] = export_onnx_graphs(decoder, folder, description, opset, custom_ops, quantize)
        elif fmt == "aoti":
            export_aoti_package(decoder, folder, description, native_isa)
        else:
            export_torchscript_module(decoder, folder, description)
    write_json(description, os.path.join(folder, CONFIG_NAME))


def export_onnx_graphs(decoder: IncrementalDecoder, folder: str, description: dict, opset: int,
                       custom_ops: str, quantize: str | None = None) -> dict[str, str]:
    """Both graphs through exporters.onnx.to_onnx_model (the registry's lowerings), and quantized when asked
    (the description gains "quantization"); the lowering per op."""
    from .onnx import save_atomically, to_onnx_model
    from .quantize import quantized_into

    try:
        ops.check_mode(custom_ops, opset)
    except ValueError as error:
        raise ExportError(str(error)) from None
    context = ops.LoweringContext.from_config(decoder.config, description["max_length"])
    lowerings = {}
    for name, module, inputs, axes in dynamic_graphs(decoder, description):
        try:
            model, lowerings = to_onnx_model(lambda: export_dynamic(module, inputs, axes), custom_ops, context, opset,
                                             description[name]["outputs"], description[name]["inputs"])
        except Exception as error:  # the exporters raise many kinds; the caller needs one, with the reason
            raise ExportError(f"ONNX export of the {name} graph failed: {first_line(error)}") from error
        path = os.path.join(folder, FILES["onnx"][name])
        with quantized_into(path, quantize) as fp32_path:
            save_atomically(model, Path(fp32_path), external_data=False)
    if quantize is not None:
        from .quantize import quantization_of

        description["quantization"] = quantization_of(path)
    return lowerings


def dynamic_graphs(decoder: IncrementalDecoder, description: dict) -> list[tuple]:
    """(name, module, example inputs, dynamic shapes) of the prefill and step graphs, for torch.export."""
    config, max_length = decoder.config, description["max_length"]
    prompt = example_prompt(config, max_length)
    _, cache = decoder.prefill(prompt)
    batch = batch_dim()
    prompt_length = Dim("prompt_length", min=1, max=max_length)
    past_length = Dim(PAST_LENGTH, min=1, max=max_length - 1)
    past_axes = [{axis: batch if size == "batch_size" else past_length
                  for axis, size in enumerate(tensor["shape"]) if size in ("batch_size", PAST_LENGTH)}
                 for tensor in map(description["cache_tensors"].get, description["cache"])]
    return [
        ("prefill", DecoderGraphs(decoder), (prompt,), ({0: batch, 1: prompt_length},)),
        ("step", StepGraph(decoder), (prompt[:, -1:].clone(), *cache.tensors()), ({0: batch}, tuple(past_axes))),
    ]


def export_aoti_package(decoder: IncrementalDecoder, folder: str, description: dict, native_isa: bool) -> None:
    """Both graphs as the models "prefill" and "step" of one AOTInductor package, each with decoder_config.json's
    content (the description, which gains cpu_march here) as metadata."""
    from .aoti import compile_package, cpu_march

    march = description["cpu_march"] = cpu_march(native_isa)
    programs = {}
    for name, module, inputs, axes in dynamic_graphs(decoder, description):
        try:
            programs[name] = export_dynamic(module, inputs, axes)
        except Exception as error:  # torch.export raises many kinds; the caller needs one, with the reason
            raise ExportError(f"torch.export of the {name} graph failed: {first_line(error)}") from error
    compile_package(os.path.join(folder, FILES["aoti"]["package"]), programs,
                    {CONFIG_NAME: json.dumps(description, indent=2, sort_keys=True)}, march)


def export_torchscript_module(decoder: IncrementalDecoder, folder: str, description: dict) -> None:
    from .torchscript import legacy_jit, non_host_ops

    prompt = example_prompt(decoder.config, description["max_length"])
    _, cache = decoder.prefill(prompt)
    module = DecoderGraphs(decoder).eval()
    with legacy_jit():
        traced = torch.jit.trace_module(
            module, {"forward": (prompt,), "step": (prompt[:, -1:].clone(), *cache.tensors())}, check_trace=False)
    foreign = sorted(set(non_host_ops(traced)) | set(non_host_ops(traced.step)))
    if foreign:
        raise ExportError(f"the traced decoder holds ops a C++ host cannot run without Python: {', '.join(foreign)}")
    extra_files = {CONFIG_NAME: json.dumps(description, indent=2, sort_keys=True)}
    with legacy_jit():
        torch.jit.save(traced, os.path.join(folder, FILES["torchscript"]["module"]), _extra_files=extra_files)

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

import os
import warnings

import torch

from reformer.files import publish, staging_folder, write_json
from reformer.generation import IncrementalDecoder, cache_layout
from reformer.sampling import DECODER_CONFIG_NAME

from .decoder_graphs import decoder_specs
from .decoder_verification import verify_decoder
from .errors import ExportError, VerificationError
from .formats import GRAPH_FORMATS
from .precision import model_as, training_modes_kept
from .specs import GraphSpec, resolve_max_length
from .tokenizer_files import write_tokenizer_files


def decoder_description(config, fmt: str, max_length: int, specs: dict[str, GraphSpec]) -> dict:
    """The content of decoder_config.json (see the module docstring); each graph's input and output names are
    its spec's (exporters.decoder_graphs.decoder_specs)."""
    layout = cache_layout(config)
    return {
        "format": fmt,
        "files": GRAPH_FORMATS[fmt].decoder_files,
        "cache": list(layout),
        "cache_tensors": layout,
        **{graph: {"inputs": list(spec.input_names), "outputs": list(spec.output_names)}
           for graph, spec in specs.items()},
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "vocab_size": config.vocab_size,
        "max_length": max_length,
        "max_position_embeddings": config.max_position_embeddings,
        "hash_seed": config.resolved_hash_seed,
        "torch_version": torch.__version__,
        "config": config.to_dict(),
    }


def export_causal_lm_with_past(model, output_dir: str, fmt: str = "onnx", *, max_length: int | None = None,
                               verify: bool = True, atol: float | None = None, keep_failed: bool = False,
                               metadata: dict | None = None, quantize: str | None = None, held_out=None,
                               tokenizer_files: dict[str, bytes] | None = None, **format_options):
    """Write the prefill and decoder-step graphs of a causal `ReformerModelWithLMHead` (fp32, CPU) and
    decoder_config.json into output_dir, which must not exist yet. max_length: the longest sequence, prompt
    plus generated tokens, the graphs must serve (2 to max_position_embeddings, the default); runtimes refuse
    longer ones. Everything is written into a staging folder beside output_dir and renamed into place at the
    end, after verification (exporters.decoder_verification.verify_decoder), so a failure leaves nothing (a
    failed verification leaves the graphs with `keep_failed`). `format_options` are the format's own
    (exporters.formats, `exporter_options`): ONNX graphs go through the op registry like the task graphs
    (`opset`, `custom_ops`); an AOTInductor package targets the portable CPU instruction set unless
    `native_isa` (exporters.aoti.cpu_march). `quantize` "int8": both ONNX graphs quantized (exporters.quantize;
    decoder_config.json records how under "quantization"), by the recipe the `held_out` windows choose where
    given (exporters.quantize.quantize_for_text), verified by their task verdict, with bits per token on them.
    `tokenizer_files` (names to contents) are written beside the graphs. The caller's model is left as it was
    (dtype, device, training mode).
    Returns (the description written to decoder_config.json plus `metadata`, the VerificationReport or None).
    Raises ExportError (VerificationError, carrying the report, when verification failed and the graphs were
    not kept)."""
    output_dir, max_length = checked_request(model, output_dir, fmt, max_length, quantize)
    with training_modes_kept(model):  # model_as puts the caller's model itself in eval mode when it needs no copy
        model = model_as(model, "fp32", "cpu")
        decoder = IncrementalDecoder(model)
        specs = decoder_specs(decoder, max_length)
        description = {**decoder_description(model.config, fmt, max_length, specs), **(metadata or {}),
                       "tokenizer_files": sorted(tokenizer_files or {})}
        report = None
        with staging_folder(output_dir) as staging:
            folder = os.path.join(staging, os.path.basename(output_dir))
            os.mkdir(folder)
            write_tokenizer_files(tokenizer_files or {}, folder)
            write_graphs(decoder, specs, folder, description, format_options, quantize, held_out)
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
    if fmt not in GRAPH_FORMATS:
        raise ExportError(f"unknown format {fmt!r}: choose one of {', '.join(GRAPH_FORMATS)}")
    if quantize is not None and not GRAPH_FORMATS[fmt].quantizable:
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


def write_graphs(decoder: IncrementalDecoder, specs: dict[str, GraphSpec], folder: str, description: dict,
                 format_options: dict, quantize: str | None, held_out=None) -> None:
    """The graphs of description["format"] (as `specs` say) and decoder_config.json (the description, which the
    exporters complete) into folder; quantized graphs by the recipe the `held_out` windows choose."""
    options = {**format_options, **({} if quantize is None else {"quantize": quantize, "held_out": held_out})}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and exporter chatter; the verification is the check
        GRAPH_FORMATS[description["format"]].export_decoder(decoder, specs, folder, description, **options)
    write_json(description, os.path.join(folder, DECODER_CONFIG_NAME))

"""Export of a causal LM for generation with a cache (task `causal-lm-with-past`): a prefill graph for the
prompt and a decoder-step graph for one new token, with the cache as explicit inputs and outputs, plus
`decoder_config.json`, which tells a runtime how to drive them. Both graphs trace
`reformer.generation.IncrementalDecoder`, the code eager generation runs.

Directory layout written by `export_causal_lm_with_past(model, output_dir, fmt)`:

    decoder_config.json    format, file names, input/output names, cache tensors with dtypes and shapes,
                           token ids (eos, pad), vocab size, max_position_embeddings, hash seed, model config
    onnx:        prefill.onnx, decoder_step.onnx   (opset 18, dynamo exporter; ONNX Runtime CPU and CUDA)
    torchscript: decoder.pt                        (torch.jit.trace, ATen ops only: libtorch runs it in C++)

The cache, for a model with layers 0..Y-1 of which the LSH layers are i, j, ... (names as in decoder_config.json,
`past_` on step inputs, `present_` on outputs; Lp is the number of cached positions):

    states_{y}   float32 [batch, Lp, hidden_size]       every layer y: layer-normed attention input per position
    buckets_{i}  int64 [batch, heads, num_hashes, Lp]   every LSH layer i: bucket per round, no round offsets
    lsh_full_attention_until  int64 [batch]             only with LSH layers; passed through unchanged

Prefill: inputs `input_ids` int64 [batch, P] (1 <= P <= max_position_embeddings; no padding: every row of a
batch has the same length) -> `logits` float32 [batch, P, vocab_size], then the `present_*` cache in the order
above (Lp = P). Step: inputs `input_ids` int64 [batch, 1] (the token at position Lp), then the `past_*` cache
-> `logits` float32 [batch, 1, vocab_size], then the `present_*` cache (Lp + 1 positions). Feed each step's
present tensors back as the next step's past tensors. Positions must stay below max_position_embeddings.

TorchScript (`decoder.pt`, for C++ hosts via torch::jit::load): `forward(input_ids)` is the prefill and returns
a tuple (logits, cache...); `step(input_ids, cache...)` returns a tuple (logits, cache...); call it as
`module.get_method("step")(inputs)` with the cache tensors as separate IValues in the order above. The
decoder_config.json content is also embedded as the extra file `decoder_config.json`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.export import Dim

from reformer.checkpoint import mode_after_umask, write_json
from reformer.generation import DecoderCache, IncrementalDecoder, cache_names
from reformer.runtime import DECODER_CONFIG_NAME

from .errors import ExportError, VerificationError, first_line
from .program import batch_dim, export_dynamic
from .specs import example_length

CONFIG_NAME = DECODER_CONFIG_NAME  # the runtime reads it; one name for both sides
FILES = {"onnx": {"prefill": "prefill.onnx", "step": "decoder_step.onnx"}, "torchscript": {"module": "decoder.pt"}}
OPSET = 18
# fp32 CPU, same ops in the same order as eager: only kernel rounding separates runtime and eager.
ATOL = 1e-5


@dataclass
class DecoderVerification:
    """Greedy decoding through the exported graphs against eager decoding (the interface of
    exporters.verify.VerificationReport that exporters.api and the CLI read)."""

    format: str
    max_abs_diff: float
    atol: float
    steps: int
    prompts: list[list[int]]  # (batch, prompt length) pairs

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.atol

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def summary_table(self) -> str:
        prompts = ", ".join(f"{batch}x{length}" for batch, length in self.prompts)
        runtime = "onnxruntime cpu" if self.format == "onnx" else "torchscript cpu"
        return (f"{runtime}: prefill + {self.steps} steps (prompts {prompts}), max abs {self.max_abs_diff:.2e}, "
                f"tolerance {self.atol:.2g}: {'pass' if self.passed else 'FAIL'}")

    def failure_message(self) -> str:
        if self.passed:
            return ""
        return (f"decoder graphs differ from eager decoding: max abs diff {self.max_abs_diff:.3g} > atol "
                f"{self.atol:g} (prompts (batch, length) {self.prompts}, {self.steps} steps)")


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


def decoder_description(config, fmt: str) -> dict:
    """The content of decoder_config.json (see the module docstring)."""
    names = cache_names(config)
    heads, hashes = config.num_attention_heads, config.num_hashes
    shapes = {}
    for name in names:
        if name.startswith("states_"):
            shapes[name] = {"dtype": "float32", "shape": ["batch_size", "past_length", config.hidden_size]}
        elif name.startswith("buckets_"):
            shapes[name] = {"dtype": "int64", "shape": ["batch_size", heads, hashes, "past_length"]}
        else:
            shapes[name] = {"dtype": "int64", "shape": ["batch_size"]}
    return {
        "format": fmt,
        "files": FILES[fmt],
        "cache": names,
        "cache_tensors": shapes,
        "prefill": {"inputs": ["input_ids"], "outputs": ["logits"] + [f"present_{name}" for name in names]},
        "step": {"inputs": ["input_ids"] + [f"past_{name}" for name in names],
                 "outputs": ["logits"] + [f"present_{name}" for name in names]},
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_position_embeddings,
        "hash_seed": config.resolved_hash_seed,
        "torch_version": torch.__version__,
        "config": config.to_dict(),
    }


def example_prompt(config, batch: int = 2) -> torch.Tensor:
    """A prompt longer than one chunk and not a multiple of the chunk lengths (the general prefill path)."""
    length = example_length(config.padding_multiple, config.max_position_embeddings - 1)
    return torch.randint(1, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))


def export_causal_lm_with_past(model, output_dir: str, fmt: str = "onnx", verify: bool = True,
                               atol: float | None = None, metadata: dict | None = None) -> dict:
    """Write the prefill and decoder-step graphs of a causal `ReformerModelWithLMHead` (fp32, CPU) and
    decoder_config.json into output_dir, which must not exist yet: everything is written into a temporary
    folder beside it and renamed into place at the end, after verification, so a failure leaves nothing.
    Returns the description written to decoder_config.json (plus `metadata`), with the verification's numbers
    under "verified". Raises ExportError (VerificationError when the graphs differ from eager decoding by
    more than atol, default ATOL)."""
    if fmt not in FILES:
        raise ExportError(f"unknown format {fmt!r}: choose one of {', '.join(FILES)}")
    if not getattr(model.config, "is_decoder", False) or not hasattr(model, "lm_head"):
        raise ExportError("causal-lm-with-past needs a causal LM (ReformerModelWithLMHead, is_decoder true)")
    output_dir = os.path.abspath(output_dir)
    if os.path.exists(output_dir):
        raise ExportError(f"output {output_dir} already exists: give a new directory")
    parent = os.path.dirname(output_dir)
    if not os.path.isdir(parent):
        raise ExportError(f"cannot write {output_dir}: {parent} is not a directory")
    model = model.float().cpu().eval()
    decoder = IncrementalDecoder(model)
    description = {**decoder_description(model.config, fmt), **(metadata or {})}
    staging = tempfile.mkdtemp(prefix=".reformer-export-", dir=parent)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and exporter chatter; the verification below is the check
            if fmt == "onnx":
                export_onnx_graphs(decoder, staging, description)
            else:
                export_torchscript_module(decoder, staging, description)
        if verify:
            verification = verify_decoder(model, staging, fmt, atol=ATOL if atol is None else atol)
            if not verification.passed:
                raise VerificationError(verification.failure_message(), verification)
            description["verified"] = verification.to_dict()
        write_json(description, os.path.join(staging, CONFIG_NAME))
        os.chmod(staging, mode_after_umask(0o777))  # mkdtemp made it private
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return description


def export_onnx_graphs(decoder: IncrementalDecoder, folder: str, description: dict) -> None:
    config = decoder.config
    prompt = example_prompt(config)
    _, cache = decoder.prefill(prompt)
    batch = batch_dim()
    prompt_length = Dim("prompt_length", min=1, max=config.max_position_embeddings)
    past_length = Dim("past_length", min=1, max=config.max_position_embeddings - 1)
    past_axes = [{0: batch, 1: past_length} if name.startswith("states_") else
                 {0: batch, 3: past_length} if name.startswith("buckets_") else {0: batch}
                 for name in description["cache"]]
    graphs = (
        ("prefill", DecoderGraphs(decoder), (prompt,), ({0: batch, 1: prompt_length},)),
        ("step", StepGraph(decoder), (prompt[:, -1:].clone(), *cache.tensors()), ({0: batch}, tuple(past_axes))),
    )
    for name, module, inputs, axes in graphs:
        try:
            program = export_dynamic(module, inputs, axes)
            onnx_program = torch.onnx.export(
                program, inputs, dynamo=True, opset_version=OPSET, input_names=description[name]["inputs"],
                output_names=description[name]["outputs"], verbose=False)
            onnx_program.save(os.path.join(folder, FILES["onnx"][name]))
        except Exception as error:  # the exporters raise many kinds; the caller needs one, with the reason
            raise ExportError(f"ONNX export of the {name} graph failed: {first_line(error)}") from error


def export_torchscript_module(decoder: IncrementalDecoder, folder: str, description: dict) -> None:
    from .torchscript import non_host_ops

    prompt = example_prompt(decoder.config)
    _, cache = decoder.prefill(prompt)
    module = DecoderGraphs(decoder).eval()
    traced = torch.jit.trace_module(
        module, {"forward": (prompt,), "step": (prompt[:, -1:].clone(), *cache.tensors())}, check_trace=False)
    foreign = sorted(set(non_host_ops(traced)) | set(non_host_ops(traced.step)))
    if foreign:
        raise ExportError(f"the traced decoder holds ops a C++ host cannot run without Python: {', '.join(foreign)}")
    extra_files = {CONFIG_NAME: json.dumps(description, indent=2, sort_keys=True)}
    torch.jit.save(traced, os.path.join(folder, FILES["torchscript"]["module"]), _extra_files=extra_files)


def verify_decoder(model, folder: str, fmt: str, steps: int | None = None, atol: float = ATOL) -> DecoderVerification:
    """Decode greedily through the exported graphs in folder and through eager `IncrementalDecoder`, feeding
    both eager's tokens, at batch sizes and lengths other than the traced ones: 3 one-token prompts (the LSH
    layers' full-attention start) and 1 prompt longer than the traced one; compare every prefill and step
    logit."""
    config = model.config
    run = load_graphs(folder, fmt)
    decoder = IncrementalDecoder(model)
    steps = steps or config.lsh_attn_chunk_length + 3
    traced_length = example_prompt(config).shape[1]
    prompts = [(3, 1), (1, min(traced_length + 2, config.max_position_embeddings - 1))]  # (batch, length)
    worst = 0.0
    for batch, length in prompts:
        steps_here = min(steps, config.max_position_embeddings - length)
        tokens = torch.randint(1, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            expected, cache = decoder.prefill(tokens)
            actual, past = run("prefill", tokens.numpy(), [])
            worst = max(worst, float(np.abs(actual - expected.numpy()).max()))
            for _ in range(steps_here):
                next_tokens = expected[:, -1:].argmax(-1)
                expected, cache = decoder.step(next_tokens, cache)
                actual, past = run("step", next_tokens.numpy(), past)
                worst = max(worst, float(np.abs(actual - expected.numpy()).max()))
    return DecoderVerification(fmt, worst, atol, steps, [list(prompt) for prompt in prompts])


def load_graphs(folder: str, fmt: str):
    """run(kind, input_ids, past) -> (logits, present) over the graphs in folder, numpy in and out."""
    files = {name: os.path.join(folder, file) for name, file in FILES[fmt].items()}
    if fmt == "torchscript":
        module = torch.jit.load(files["module"], map_location="cpu")

        def run(kind, input_ids, past):
            method = module.forward if kind == "prefill" else module.step
            outputs = method(torch.from_numpy(input_ids), *(torch.from_numpy(t) for t in past))
            return outputs[0].numpy(), [t.numpy() for t in outputs[1:]]
        return run

    import onnxruntime

    sessions = {kind: onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
                for kind, path in files.items()}

    def run(kind, input_ids, past):
        session = sessions[kind]
        names = [graph_input.name for graph_input in session.get_inputs()]
        outputs = session.run(None, dict(zip(names, [input_ids, *past])))
        return outputs[0], outputs[1:]
    return run


"""One export spec per task: what the graph takes, what it returns, which axes are dynamic (named: the ONNX
dimensions and torch.export's, exporters.program, both come from them), how close it must stay to eager.
The exporters and the verifier take a graph's inputs, outputs and axes from here. `GraphSpec` is one exported
graph as torch.export sees it: a task graph's (`ExportWrapper.graph_spec`) or one of causal-lm-with-past's
(exporters.decoder_graphs.decoder_specs)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .choices import TASK_HEADS
from .errors import ExportError

INPUT_IDS = "input_ids"
INPUT_NAMES = (INPUT_IDS, "attention_mask")
BATCH_SIZE = "batch_size"
SEQUENCE_LENGTH = "sequence_length"
DYNAMIC_AXES = {0: BATCH_SIZE, 1: SEQUENCE_LENGTH}
BATCH_RANGE = (1, 4096)
BUCKETS_OUTPUT_PREFIX = "buckets_"
# Inputs of a verification twin (see ExportWrapper): the buckets each LSH layer must use instead of its own.
FORCED_BUCKETS_PREFIX = "forced_buckets_"
BUCKETS_AXES = {0: BATCH_SIZE, 3: SEQUENCE_LENGTH}  # B, H, N, L


@dataclass(frozen=True)
class GraphSpec:
    """One exported graph: its input and output names, in order; the named dynamic axes of its inputs and
    outputs (name -> axis -> dimension name, as torch.onnx's dynamic_axes: through exporters.program
    .dynamic_shapes torch.export's dimensions, and a task graph's ONNX dimension names) and each dimension's
    range (min, max); the example inputs it is traced at, as its module takes them; and `packed`: (the module's
    argument, a prefix) when that argument takes every input whose name has the prefix as one tuple."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]
    dim_ranges: dict[str, tuple[int, int]]
    example_inputs: tuple
    packed: tuple[str, str] | None = None


@dataclass(frozen=True)
class TaskSpec:
    name: str
    model_class: str
    output_names: tuple[str, ...]

    def wrap(self, model: nn.Module, with_buckets: bool = False, replay: bool = False) -> "ExportWrapper":
        """The model as an exportable module (see ExportWrapper); `replay` makes the verification twin."""
        if model.config.attn_implementation != "eager":
            # reformer/attention/flex.py says why torch.export does not take FlexAttention yet.
            raise ExportError(f"models with attn_implementation={model.config.attn_implementation!r} do not export "
                              "yet: call model.set_attn_implementation('eager') first (the same numbers)")
        return ExportWrapper(model, self, with_buckets or replay, replay)

    def input_names(self, lsh_layers: int = 0, replay: bool = False) -> list[str]:
        return list(INPUT_NAMES) + ([f"{FORCED_BUCKETS_PREFIX}{index}" for index in range(lsh_layers)] if replay else [])

    def dynamic_axes(self, lsh_layers: int = 0, with_buckets: bool = False, replay: bool = False
                     ) -> dict[str, dict[int, str]]:
        """ONNX-style dynamic axes of every input and output."""
        axes = {name: dict(DYNAMIC_AXES) for name in INPUT_NAMES}
        for name in self.output_names:
            axes[name] = {0: BATCH_SIZE} if name == "logits" and self.name == "sequence-classification" else dict(
                DYNAMIC_AXES)
        for index in range(lsh_layers):
            if with_buckets or replay:
                axes[f"{BUCKETS_OUTPUT_PREFIX}{index}"] = dict(BUCKETS_AXES)
            if replay:
                axes[f"{FORCED_BUCKETS_PREFIX}{index}"] = dict(BUCKETS_AXES)
        return axes

    def per_position(self, name: str) -> bool:
        """Whether output `name` has one value per position (its sequence axis is dynamic); those values are
        compared only where the attention mask keeps the position."""
        return 1 in self.dynamic_axes()[name]

    def all_output_names(self, lsh_layers: int = 0, with_buckets: bool = False) -> list[str]:
        names = list(self.output_names)
        if with_buckets:
            names += [f"{BUCKETS_OUTPUT_PREFIX}{index}" for index in range(lsh_layers)]
        return names


class ExportWrapper(nn.Module):
    """forward(input_ids, attention_mask) -> tuple of tensors in the spec's output order, then (optionally)
    the buckets of each LSH layer, B, H, N, L int64, for checking bucket agreement across runtimes.

    The verification twin (`replay`) is the same graph with one change: forward(input_ids, attention_mask,
    forced_buckets), one B, H, N, L tensor per LSH layer, which the LSH layers use instead of their own
    hashing; it still returns the buckets its hashing chose. Verification feeds it eager's buckets, so that
    what is left of the difference to eager is arithmetic, and checks every bucket it would have chosen
    otherwise. A twin is never shipped."""

    def __init__(self, model: nn.Module, spec: TaskSpec, with_buckets: bool, replay: bool = False):
        super().__init__()
        self.model = model
        self.spec = spec
        self.with_buckets = with_buckets
        self.replay = replay

    def input_names(self) -> list[str]:
        return self.spec.input_names(self.model.config.attn_layers.count("lsh"), self.replay)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """The spec's axes of this graph's inputs and outputs, named (the ONNX dimensions' names and, through
        exporters.program.dynamic_shapes, torch.export's dimensions)."""
        return self.spec.dynamic_axes(self.model.config.attn_layers.count("lsh"), self.with_buckets, self.replay)

    def graph_spec(self, example_inputs: tuple, max_length: int) -> GraphSpec:
        """This graph traced at example_inputs (wrapper_example_inputs), serving lengths up to max_length."""
        lsh_layers = self.model.config.attn_layers.count("lsh")
        return GraphSpec(tuple(self.input_names()), tuple(self.spec.all_output_names(lsh_layers, self.with_buckets)),
                         self.dynamic_axes(), {BATCH_SIZE: BATCH_RANGE, SEQUENCE_LENGTH: (1, max_length)},
                         example_inputs, ("forced_buckets", FORCED_BUCKETS_PREFIX) if self.replay else None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                forced_buckets: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, ...]:
        if self.replay != (forced_buckets is not None):
            raise ValueError("forced_buckets are the verification twin's input, and only its")
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, forced_buckets=forced_buckets)
        tensors = tuple(getattr(output, name) for name in self.spec.output_names)
        return tensors + tuple(output.buckets) if self.with_buckets else tensors


TASKS = {name: TaskSpec(name, model_class, output_names) for name, (model_class, output_names) in TASK_HEADS.items()}
MODEL_CLASS_TO_TASK = {spec.model_class: spec.name for spec in TASKS.values()}


def resolve_max_length(config, max_length: int | None) -> int:
    """The longest sequence an exported graph must serve (default max_position_embeddings)."""
    max_length = config.max_position_embeddings if max_length is None else max_length
    if not 1 <= max_length <= config.max_position_embeddings:
        raise ExportError(f"max_length {max_length} must be between 1 and max_position_embeddings "
                          f"{config.max_position_embeddings}")
    return max_length


def example_length(padding_multiple: int, max_length: int) -> int:
    """A length that spans more than one chunk and is not a multiple of the chunk length, so a trace or an
    export sees the general path (internal padding, several chunks); capped at max_length."""
    return min(max_length, padding_multiple + padding_multiple // 2 + 1)


def example_inputs(config, max_length: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch 2 at example_length: random ids, and a mask that pads the tail of the second row (masking must not
    be traced away). Exporters check the graph at other shapes afterwards."""
    length = example_length(config.padding_multiple, max_length)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, config.vocab_size, (2, length), generator=generator)
    attention_mask = torch.ones(2, length, dtype=torch.long)
    attention_mask[1, length - length // 3:] = 0
    return input_ids.to(device), attention_mask.to(device)


def wrapper_example_inputs(wrapper: ExportWrapper, config, max_length: int, device: str) -> tuple:
    """example_inputs, and for a verification twin the buckets the model's own hashing gives them."""
    input_ids, attention_mask = example_inputs(config, max_length, device)
    if not wrapper.replay:
        return input_ids, attention_mask
    with torch.no_grad():
        buckets = wrapper.model(input_ids=input_ids, attention_mask=attention_mask).buckets
    return input_ids, attention_mask, tuple(buckets)


# The key prefix of a graph's description entries in ONNX metadata (exporters.onnx, exporters.quantize).
METADATA_PREFIX = "reformer_export."


def graph_description(config, spec: TaskSpec, *, max_length: int, dtype: str, with_buckets: bool) -> dict:
    """What every exported task graph records about itself (each exporter adds its own fields)."""
    lsh_layers = config.attn_layers.count("lsh")
    return {
        "task": spec.name,
        "model_class": spec.model_class,
        "input_names": list(INPUT_NAMES),
        "output_names": spec.all_output_names(lsh_layers, with_buckets),
        "hash_seed": config.resolved_hash_seed,
        # The reference draws fresh rotations on every call when a config has no seed; the graph fixed one.
        "hash_seed_defaulted": config.hash_seed is None,
        "num_buckets": config.num_buckets,
        # Resolved from max_position_embeddings; the reference picks them from the first length it runs.
        "num_buckets_defaulted": config.num_buckets_defaulted,
        "vocab_size": config.vocab_size,
        "max_length": max_length,
        "padding_multiple": config.padding_multiple,
        "dtype": dtype,
        "with_buckets": with_buckets,
    }


def embedded_description(config, spec: TaskSpec, wrapper: ExportWrapper, fmt: str, *, max_length: int, dtype: str,
                         device: str) -> dict:
    """The JSON description a file for libtorch hosts embeds (a TorchScript file, an AOTInductor package):
    graph_description plus the format, the dynamic axes of every input and output, the device, torch's version
    and the whole config. Each exporter adds the shape it exported at."""
    description = graph_description(config, spec, max_length=max_length, dtype=dtype, with_buckets=wrapper.with_buckets)
    description.update(
        format=fmt,
        dynamic_axes=spec.dynamic_axes(config.attn_layers.count("lsh"), wrapper.with_buckets, wrapper.replay),
        device=device,
        torch_version=torch.__version__,
        config=config.to_dict(),
    )
    return description

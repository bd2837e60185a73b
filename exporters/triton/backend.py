"""The Python-backend models of a Triton repository written by `reformer-export --format triton`: each
`model.py` there imports one of these classes as `TritonPythonModel`. numpy and `reformer.runtime` only, no
torch: the server's Python process imports this module (`triton_python_backend_utils` is the server's own
module, imported when the server loads the model).

- `TaskModel` serves an exported task graph through `reformer.runtime.OnnxModel`;
- `GenerationModel` serves generation over the prefill and step graphs through `reformer.runtime.OnnxGenerator`.

Dynamic batching changes no answer. Reformer's attention depends on a row's length, not only on its mask
(chunk boundaries and the wrap-around of LSH's bucket order at the row's end; see `reformer.sampling`), so
padding a short request to a longer one's length would change its outputs. `TaskModel` therefore runs the
requests of one batch in groups of equal length, each group as one batch (rows are computed independently, so
a row's outputs are those of running it alone). `GenerationModel` batches greedy requests with the same options
(`OnnxGenerator` prefills prompts of equal length together and aligns their caches, so every row's tokens are
those of generating it alone) and runs each sampled request alone, as its seed draws for its own rows only.

Every request is checked first (rank, dtype, ids inside the vocabulary, length within the export's maximum,
not empty, mask of the ids' shape with 0 and 1 only, generation options); a bad request gets an error response
and the others in its batch are served."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from reformer.runtime import CPU, CUDA, OnnxGenerator, OnnxModel
from reformer.sampling import TokenChooser, check_generation_length, check_in_vocabulary

TASK_GRAPH = "model.onnx"  # in the version folder: the graph, or a folder holding it and its external data
GENERATION_GRAPHS = "graphs"  # in the version folder: the causal-lm-with-past directory
# Generation options a request may give, each as a [1] tensor: name -> numpy dtype its value is read as.
GENERATION_OPTIONS = {"do_sample": np.bool_, "temperature": np.float32, "top_k": np.int32, "top_p": np.float32,
                      "seed": np.int64, "repetition_penalty": np.float32, "eos_token_id": np.int64}


class BadRequest(ValueError):
    """A request the model cannot serve; its message is the error response's."""


def parameters(model_config: dict) -> dict[str, str]:
    """The string parameters of a model's config.pbtxt (reformer-export writes vocab_size, max_length, ...)."""
    return {key: value["string_value"] for key, value in model_config.get("parameters", {}).items()}


def providers(args: dict) -> list:
    """The instance's device, as ONNX Runtime providers: the GPU the server assigned, or the CPU."""
    if args.get("model_instance_kind") == "GPU":
        return [(CUDA, {"device_id": str(args.get("model_instance_device_id", 0))}), CPU]
    return [CPU]


def input_array(request, name: str, required: bool = True) -> np.ndarray | None:
    import triton_python_backend_utils as pb_utils

    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        if required:
            raise BadRequest(f"input {name} is missing")
        return None
    return tensor.as_numpy()


def error_response(message: str):
    import triton_python_backend_utils as pb_utils

    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))


def check_token_ids(input_ids: np.ndarray, vocab_size: int, max_length: int) -> None:
    """input_ids must be int64 B, L with 1 <= L <= max_length and every id inside the vocabulary."""
    if input_ids.dtype != np.int64 or input_ids.ndim != 2:
        raise BadRequest(f"input_ids must be int64 of shape (batch, length), got {input_ids.dtype} "
                         f"{list(input_ids.shape)}")
    batch, length = input_ids.shape
    if batch == 0 or length == 0:
        raise BadRequest(f"input_ids is empty (shape {list(input_ids.shape)}): send at least one token")
    if length > max_length:
        raise BadRequest(f"input_ids has {length} tokens; this model serves at most {max_length}")
    try:
        check_in_vocabulary(input_ids, vocab_size)
    except ValueError as error:
        raise BadRequest(str(error)) from None


def check_attention_mask(attention_mask: np.ndarray | None, input_ids: np.ndarray) -> np.ndarray:
    """The request's mask (all ones when it sends none); it must have the ids' shape and hold 0 and 1 only."""
    if attention_mask is None:
        return np.ones_like(input_ids)
    if attention_mask.dtype != np.int64 or attention_mask.shape != input_ids.shape:
        raise BadRequest(f"attention_mask must be int64 of the shape of input_ids {list(input_ids.shape)}, got "
                         f"{attention_mask.dtype} {list(attention_mask.shape)}")
    if not np.isin(attention_mask, (0, 1)).all():
        raise BadRequest("attention_mask must hold 0 (padding) and 1 (token) only")
    return attention_mask


class TaskModel:
    """An exported task graph: inputs input_ids and (optional) attention_mask, the graph's outputs by name."""

    def initialize(self, args: dict) -> None:
        model_config = json.loads(args["model_config"])
        settings = parameters(model_config)
        self.vocab_size = int(settings["vocab_size"])
        self.max_length = int(settings["max_length"])
        graph = os.path.join(args["model_repository"], args["model_version"], TASK_GRAPH)
        if os.path.isdir(graph):  # the folder form, for a graph with external data
            graph = os.path.join(graph, TASK_GRAPH)
        self.model = OnnxModel(graph, providers=providers(args))
        self.output_names = [output["name"] for output in model_config["output"]]

    def execute(self, requests: list) -> list:
        import triton_python_backend_utils as pb_utils

        responses: list = [None] * len(requests)
        by_length: dict[int, list[tuple[int, np.ndarray, np.ndarray]]] = {}
        for index, request in enumerate(requests):
            try:
                input_ids = input_array(request, "input_ids")
                check_token_ids(input_ids, self.vocab_size, self.max_length)
                mask = check_attention_mask(input_array(request, "attention_mask", required=False), input_ids)
            except BadRequest as error:
                responses[index] = error_response(str(error))
                continue
            by_length.setdefault(input_ids.shape[1], []).append((index, input_ids, mask))
        for group in by_length.values():
            outputs = self.model(np.concatenate([ids for _, ids, _ in group]),
                                 np.concatenate([mask for _, _, mask in group]))
            start = 0
            for index, input_ids, _ in group:
                rows = slice(start, start + len(input_ids))
                start = rows.stop
                responses[index] = pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(name, outputs[name][rows]) for name in self.output_names])
        return responses


@dataclass
class GenerationRequest:
    index: int
    input_ids: np.ndarray
    max_new_tokens: int
    options: dict

    @property
    def batch_key(self) -> tuple | None:
        """Requests with equal keys are generated together; None: alone (sampling draws from the request's seed)."""
        return None if self.options.get("do_sample") else (self.max_new_tokens, tuple(sorted(self.options.items())))


def request_value(request, name: str, dtype, rows: int):
    """The one value of a per-request input: B, 1 with the same value in every row, as a Python number."""
    value = input_array(request, name)
    if value.size != rows:
        raise BadRequest(f"{name} must hold one value per row of input_ids, got shape {list(value.shape)}")
    if len(set(value.reshape(-1).tolist())) > 1:
        raise BadRequest(f"{name} must be the same for every row of a request")
    return dtype(value.reshape(-1)[0]).item()


class GenerationModel:
    """Generation: inputs input_ids (B, prompt length), max_new_tokens and the optional options of
    GENERATION_OPTIONS; output output_ids, the new tokens (B, up to max_new_tokens: a request whose rows have
    all produced the end-of-sequence token stops there, as `OnnxGenerator.generate` on it alone does)."""

    def initialize(self, args: dict) -> None:
        self.generator = OnnxGenerator(os.path.join(args["model_repository"], args["model_version"],
                                                    GENERATION_GRAPHS), providers=providers(args))

    def parse(self, index: int, request) -> GenerationRequest:
        input_ids = input_array(request, "input_ids")
        check_token_ids(input_ids, self.generator.vocab_size, self.generator.max_length)
        max_new_tokens = request_value(request, "max_new_tokens", np.int32, len(input_ids))
        options = {}
        for name, dtype in GENERATION_OPTIONS.items():
            if input_array(request, name, required=False) is not None:
                options[name] = request_value(request, name, dtype, len(input_ids))
        try:
            check_generation_length(self.generator.max_length, "this model's max_length", input_ids.shape[1],
                                    max_new_tokens)
            TokenChooser.from_options(options, None)  # checks the values (temperature > 0, ...)
        except ValueError as error:
            raise BadRequest(str(error)) from None
        return GenerationRequest(index, input_ids, max_new_tokens, options)

    def execute(self, requests: list) -> list:
        import triton_python_backend_utils as pb_utils

        responses: list = [None] * len(requests)
        batches: dict[tuple, list[GenerationRequest]] = {}
        alone = []
        for index, request in enumerate(requests):
            try:
                parsed = self.parse(index, request)
            except BadRequest as error:
                responses[index] = error_response(str(error))
                continue
            if parsed.batch_key is None:
                alone.append([parsed])
            else:
                batches.setdefault(parsed.batch_key, []).append(parsed)
        for group in list(batches.values()) + alone:
            for parsed, new_tokens in zip(group, self.generate(group)):
                responses[parsed.index] = pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("output_ids", new_tokens)])
        return responses

    def generate(self, group: list[GenerationRequest]) -> list[np.ndarray]:
        """Each request's new tokens, B, T: the group's prompts generated as one batch (they share their options),
        each request's cut where all its rows have produced the end-of-sequence token."""
        first = group[0]
        prompts = [row for request in group for row in request.input_ids]
        sequences = self.generator.generate(prompts, first.max_new_tokens, **first.options)
        new_tokens = sequences[:, max(len(row) for row in prompts):]  # the prompts are left-padded to the longest
        eos = first.options.get("eos_token_id")  # as OnnxGenerator: no stop unless the request names the token
        results, start = [], 0
        for request in group:
            rows = new_tokens[start:start + len(request.input_ids)]
            start += len(request.input_ids)
            results.append(rows[:, :steps_until_finished(rows, eos)])
        return results


def steps_until_finished(new_tokens: np.ndarray, eos_token_id: int | None) -> int:
    """How many steps generating these rows alone takes: until every row has produced eos (all of them without)."""
    if eos_token_id is None:
        return new_tokens.shape[1]
    produced = new_tokens == eos_token_id
    if not produced.any(axis=1).all():
        return new_tokens.shape[1]
    return int(produced.argmax(axis=1).max()) + 1

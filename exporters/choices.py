"""What an export request can choose, by name, without torch: the CLI offers these (so that `reformer-export
--help` answers at once), and the modules that implement each choice take its names from here. The formats
are exporters.formats' registry."""

from __future__ import annotations

# Each task graph: the head that computes it (a reformer.MODEL_CLASSES name) and its outputs, in order;
# exporters.specs.TASKS holds the export spec of each.
TASK_HEADS = {
    "base": ("ReformerModel", ("last_hidden_state",)),
    "causal-lm": ("ReformerModelWithLMHead", ("logits",)),
    "masked-lm": ("ReformerForMaskedLM", ("logits",)),
    "sequence-classification": ("ReformerForSequenceClassification", ("logits",)),
    "question-answering": ("ReformerForQuestionAnswering", ("start_logits", "end_logits")),
}
# Not a task graph: a directory of two graphs for generation with a cache (exporters/decoder.py).
GENERATION_TASK = "causal-lm-with-past"
TASK_NAMES = (*TASK_HEADS, GENERATION_TASK)
# Export precisions, with the torch dtype each names (exporters.precision).
DTYPES = {"fp32": "float32", "fp16": "float16"}
DEVICES = ("cpu", "cuda")
# ONNX lowerings of the custom ops (exporters/ops/registry.py says what each mode does).
CUSTOM_OPS_MODES = ("auto", "standard", "ort", "onnx-attention")
DEFAULT_CUSTOM_OPS = "auto"
# ONNX Runtime runs every opset from 18 (torch.onnx's own lowest) up to 23 (the first with ONNX's Attention op,
# exporters.ops' "onnx-attention" lowering) with the ops this graph uses.
SUPPORTED_OPSETS = range(18, 24)
DEFAULT_OPSET = 18
QUANTIZATIONS = ("int8",)  # exporters/quantize.py
# models/<name>, in the order --help lists them (exporters.models.built_in_models reads the folder).
BUILT_IN_MODELS = ("byte-lm", "tiny", "enwik8")
DEFAULT_MODEL = "byte-lm"
# Each backend of a Triton model repository, with the graph format it serves (exporters/triton/layout.py).
TRITON_BACKENDS = {"python": "onnx", "onnxruntime": "onnx", "pytorch": "torchscript"}
DEFAULT_TRITON_BACKEND = "python"

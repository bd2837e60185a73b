"""Reformer (Kitaev et al. 2020) in trace-friendly PyTorch, weight- and config-compatible with `transformers`.

Names are imported on first use, so that `reformer.runtime` (numpy and onnxruntime only) loads without torch."""

import importlib

_MODULE_OF = {
    "CheckpointError": ".checkpoint",
    "ConfigError": ".config",
    "MODEL_CLASSES": ".models",
    "ModelFileError": ".file_checks",
    "ReformerConfig": ".config",
    "ReformerForMaskedLM": ".models",
    "ReformerForQuestionAnswering": ".models",
    "ReformerForSequenceClassification": ".models",
    "ReformerModel": ".models",
    "ReformerModelWithLMHead": ".models",
}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name], __name__), name)

"""Reformer (Kitaev et al. 2020) in trace-friendly PyTorch, weight- and config-compatible with `transformers`."""

from .checkpoint import CheckpointError
from .config import ConfigError, ReformerConfig
from .models import (
    MODEL_CLASSES,
    ReformerForMaskedLM,
    ReformerForQuestionAnswering,
    ReformerForSequenceClassification,
    ReformerModel,
    ReformerModelWithLMHead,
)

__all__ = [
    "CheckpointError",
    "ConfigError",
    "MODEL_CLASSES",
    "ReformerConfig",
    "ReformerForMaskedLM",
    "ReformerForQuestionAnswering",
    "ReformerForSequenceClassification",
    "ReformerModel",
    "ReformerModelWithLMHead",
]

"""Resolving `--model PATH_OR_NAME` into a model for one task.

PATH_OR_NAME is, in this order (see `locate`): a checkpoint directory (config.json plus model.safetensors, a
sharded safetensors index or pytorch_model.bin, as `transformers` or this project save them); the name of a
built-in model in `models/` (models/<name>/config.json, with weights where shipped); or a Hugging Face Hub
model id, namespace/name (reformer.checkpoint.download_checkpoint, with huggingface_hub installed). A
built-in model shipped as a config alone gets random weights drawn from RANDOM_WEIGHTS_SEED, so its exports
are reproducible; the export's metadata says so."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import reformer
from reformer import tokenizer
from reformer.tokenizer import tokenizer_metadata
from reformer.checkpoint import (
    PYTORCH_NAME,
    SAFETENSORS_INDEX_NAME,
    SAFETENSORS_NAME,
    CheckpointError,
    download_checkpoint,
    is_hub_id,
)
from reformer.config import CONFIG_NAME, ConfigError, ReformerConfig

from .choices import DEFAULT_MODEL
from .errors import ExportError
from .specs import MODEL_CLASS_TO_TASK, TASKS, TaskSpec
from .tokenizer_files import CarriedTokenizer, carried_tokenizer

# pyproject.toml installs models/ as this package: a name no other distribution's folder can take, where any
# package's top-level `models/` would hide the built-in models.
MODELS_PACKAGE = "reformer_export_models"


def find_models_dir() -> Path:
    """The built-in models beside these packages: MODELS_PACKAGE in a regular install (wheel, --user or
    not), else models/ of the source checkout they run from (in place or installed editable)."""
    beside = Path(__file__).resolve().parent.parent
    installed = beside / MODELS_PACKAGE
    return installed if installed.is_dir() else beside / "models"


MODELS_DIR = find_models_dir()
RANDOM_WEIGHTS_SEED = 0
WEIGHT_FILES = (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, PYTORCH_NAME)
# Text the model did not train on, UTF-8; a checkpoint directory may ship one.
HELD_OUT_NAME = "held-out.txt"


@dataclass
class ResolvedModel:
    model: nn.Module
    spec: TaskSpec
    name: str  # the built-in model's name, the Hub id's model name or the checkpoint directory's base name
    directory: str  # for a Hub model: its snapshot in huggingface_hub's cache
    built_in: bool
    random_weights_seed: int | None  # set when the weights were drawn at random (config-only built-in model)
    hub_id: str | None = None  # set when the model came from the Hugging Face Hub
    tokenizer: CarriedTokenizer = field(default_factory=CarriedTokenizer)  # the checkpoint's tokenizer files

    @property
    def source(self) -> str:
        """Where the model came from: built-in, the Hub id at the snapshot's commit (huggingface_hub names
        snapshot folders after their commit), or the checkpoint directory."""
        if self.built_in:
            return "built-in"
        if self.hub_id:
            return f"Hugging Face Hub {self.hub_id}@{os.path.basename(self.directory)}"
        return self.directory

    def describe(self) -> str:
        """One line for people: where the model came from and whether its weights are random."""
        weights = "" if self.random_weights_seed is None else f"; random weights, seed {self.random_weights_seed}"
        return f"{self.name} ({self.source}{weights})"

    def held_out_windows(self, length: int) -> torch.Tensor | None:
        """The model's held-out text (HELD_OUT_NAME in its directory, for byte-vocabulary models: see
        reformer/tokenizer.py), as every whole window of `length` tokens (W, length), None without one. A
        quantized graph's task verdict measures bits per token on it (exporters.task_verdict)."""
        path = os.path.join(self.directory, HELD_OUT_NAME)
        if self.model.config.vocab_size != tokenizer.VOCAB_SIZE or not os.path.isfile(path):
            return None
        with open(path, "rb") as handle:
            ids = torch.tensor(tokenizer.encode(handle.read()))
        windows = len(ids) // length
        return ids[:windows * length].view(windows, length) if windows else None

    def metadata(self) -> dict:
        """What an exported file records about its origin."""
        return {
            "model_name": self.name,
            "model_source": self.source,
            "random_weights_seed": self.random_weights_seed,
        }

    def graph_metadata(self) -> dict:
        """What a single graph records: `metadata` and the tokenizer files as entries (exporters.tokenizer_files)."""
        return {**self.metadata(), **tokenizer_metadata(self.tokenizer.files)}


def built_in_models(models_dir: Path = MODELS_DIR) -> list[str]:
    if not models_dir.is_dir():
        return []
    return sorted(entry.name for entry in models_dir.iterdir() if (entry / CONFIG_NAME).is_file())


def resolve_model(path_or_name: str | None, task: str | None = None, models_dir: Path = MODELS_DIR) -> ResolvedModel:
    """The model for `task` (None: the checkpoint's own task, see default_task), in eval mode on the CPU in
    fp32. Raises CheckpointError, ConfigError or ExportError with a message that says what to fix."""
    path_or_name = path_or_name or DEFAULT_MODEL
    directory, built_in, hub_id = locate(path_or_name, models_dir)
    config = ReformerConfig.from_pretrained(directory)
    task = task or default_task(config)
    if task not in TASKS:
        raise ExportError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    check_config_fits_task(config, task)
    model_class = reformer.MODEL_CLASSES[TASKS[task].model_class]
    name = path_or_name if built_in else os.path.basename(os.path.normpath(hub_id or directory))
    tokenizer = carried_tokenizer(directory, config.vocab_size)
    if built_in and not any(os.path.isfile(os.path.join(directory, weights)) for weights in WEIGHT_FILES):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            model = model_class(config).eval()
        return ResolvedModel(model, TASKS[task], name, directory, built_in, RANDOM_WEIGHTS_SEED, tokenizer=tokenizer)
    model = model_class.from_pretrained(directory, config=config)
    return ResolvedModel(model, TASKS[task], name, directory, built_in, None, hub_id, tokenizer)


def locate(path_or_name: str, models_dir: Path) -> tuple[str, bool, str | None]:
    """(directory, whether it is a built-in model, the Hub id it was fetched as). An existing path wins over
    a built-in name and a Hub id; built-in names have no '/' and Hub ids one, so those two never compete."""
    if os.path.isdir(path_or_name):
        return path_or_name, False, None
    if os.path.exists(path_or_name):
        raise CheckpointError(f"{path_or_name} is a file: give a checkpoint directory (config.json and weights)")
    if path_or_name in built_in_models(models_dir):
        return str(models_dir / path_or_name), True, None
    if is_hub_id(path_or_name):
        return download_checkpoint(path_or_name), False, path_or_name
    raise CheckpointError(
        f"no model directory {path_or_name} and no built-in model of that name "
        f"(built-in: {', '.join(built_in_models(models_dir)) or 'none'}; a Hugging Face Hub id is namespace/name)"
    )


def default_task(config: ReformerConfig) -> str:
    """The task of the checkpoint's head (config.json `architectures`, as `transformers` writes it); without
    one, causal-lm for a causal model and base otherwise (base loads any checkpoint: heads are dropped)."""
    for architecture in config.extra.get("architectures") or []:
        if architecture in MODEL_CLASS_TO_TASK:
            return MODEL_CLASS_TO_TASK[architecture]
    return "causal-lm" if config.is_decoder else "base"


def check_config_fits_task(config: ReformerConfig, task: str) -> None:
    if task == "causal-lm" and not config.is_decoder:
        raise ConfigError("task causal-lm needs a causal model (is_decoder: true in config.json); "
                          "for a bidirectional model use masked-lm or base")
    if task == "masked-lm" and config.is_decoder:
        raise ConfigError("task masked-lm needs a bidirectional model (is_decoder: false in config.json); "
                          "for a causal model use causal-lm or base")

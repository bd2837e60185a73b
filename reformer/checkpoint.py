"""Loading and saving checkpoint directories in the layout `transformers`' `save_pretrained` writes:
config.json plus model.safetensors (or a sharded index, or pytorch_model.bin)."""

from __future__ import annotations

import json
import os
import pickle

import torch

from .config import CONFIG_NAME, ConfigError, ReformerConfig
from .files import atomic_write, write_json
from .messages import first_line

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
PYTORCH_NAME = "pytorch_model.bin"
# Older checkpoints tie `lm_head.bias` to `lm_head.decoder.bias`; newer ones store both.
LEGACY_ALIASES = {"lm_head.bias": "lm_head.decoder.bias"}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded into the requested model."""


def read_state_dict(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint directory, read without running any pickled code."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = os.fspath(directory)
    try:
        if os.path.isfile(os.path.join(directory, SAFETENSORS_NAME)):
            return load_file(os.path.join(directory, SAFETENSORS_NAME))
        index_path = os.path.join(directory, SAFETENSORS_INDEX_NAME)
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as handle:
                shards = sorted(set(json.load(handle)["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(load_file(os.path.join(directory, shard)))
            return state
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read safetensors weights in {directory}: {error}") from None
    pytorch_path = os.path.join(directory, PYTORCH_NAME)
    if os.path.isfile(pytorch_path):
        try:
            state = torch.load(pytorch_path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise CheckpointError(
                f"{pytorch_path} holds more than tensors and was not loaded (only weights are unpickled): "
                f"{first_line(error)}"
            ) from None
        except (RuntimeError, EOFError, OSError) as error:
            raise CheckpointError(f"cannot read {pytorch_path}: {first_line(error)}") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{pytorch_path} does not hold a state dict of tensors")
        return state
    raise CheckpointError(
        f"no weights in {directory}: expected {SAFETENSORS_NAME}, {SAFETENSORS_INDEX_NAME} or {PYTORCH_NAME}"
    )


class CheckpointMixin:
    """from_pretrained / save_pretrained for the Reformer model classes."""

    base_model_prefix: str

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, config: ReformerConfig | None = None):
        """Load a directory written by `transformers` or by this project. Weights saved from a model with a
        head load into the base model (the head is dropped) and the other way round only for the base part."""
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise CheckpointError(f"model directory {directory} does not exist")
        if config is None:
            try:
                config = ReformerConfig.from_pretrained(directory)
            except ConfigError as error:
                raise CheckpointError(str(error)) from None
        model = cls(config)
        model.load_checkpoint_state(read_state_dict(directory))
        return model.eval()

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        expected = self.state_dict()
        state = self.adapt_keys(dict(state), expected)
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        mis_shaped = sorted(
            f"{key} {tuple(state[key].shape)} vs {tuple(expected[key].shape)}"
            for key in set(state) & set(expected)
            if state[key].shape != expected[key].shape
        )
        problems = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped)):
            if keys:
                shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
                problems.append(f"{len(keys)} {label} weight(s): {shown}")
        if problems:
            raise CheckpointError(f"weights do not fit {type(self).__name__}: " + "; ".join(problems))
        self.load_state_dict(state, strict=True)

    def adapt_keys(self, state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict:
        prefix = self.base_model_prefix + "."
        is_base_model = not any(key.startswith(prefix) for key in expected)
        if is_base_model and any(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
        elif not is_base_model and not any(key.startswith(prefix) for key in state):
            state = {prefix + key: value for key, value in state.items()}
        for alias, key in LEGACY_ALIASES.items():
            if alias in state:
                aliased = state.pop(alias)
                state.setdefault(key, aliased)
        return state

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config.json and model.safetensors, each atomically (temporary file, then rename)."""
        from safetensors.torch import save_file

        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        state = {key: value.detach().contiguous().cpu() for key, value in self.state_dict().items()}
        for alias, key in LEGACY_ALIASES.items():
            if key in state:
                state[alias] = state[key].clone()
        config = self.config.to_dict()
        config["architectures"] = [type(self).__name__]
        atomic_write(os.path.join(directory, SAFETENSORS_NAME), lambda path: save_file(state, path))
        atomic_write(os.path.join(directory, CONFIG_NAME), lambda path: write_json(config, path))


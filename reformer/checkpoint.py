"""Loading and saving checkpoint directories in the layout `transformers`' `save_pretrained` writes:
config.json plus model.safetensors (or a sharded index, or pytorch_model.bin), and fetching them from the
Hugging Face Hub by model id (namespace/name) through huggingface_hub, an optional dependency: it downloads
a model into its cache once, and reads the cache from then on (offline too, with HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re

import torch

from .config import CONFIG_NAME, ConfigError, ReformerConfig
from .file_checks import stays_inside
from .files import atomic_write, write_json
from .messages import first_line
from .tokenizer import TOKENIZER_FILES

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
PYTORCH_NAME = "pytorch_model.bin"
# Older checkpoints tie `lm_head.bias` to `lm_head.decoder.bias`; newer ones store both.
LEGACY_ALIASES = {"lm_head.bias": "lm_head.decoder.bias"}
# A Hub model id as huggingface_hub spells it: namespace/name, each of letters, digits, '-', '_' and '.'.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# What a checkpoint needs from a Hub repository (read_state_dict picks among the weight files), and its tokenizer.
HUB_CHECKPOINT_FILES = [CONFIG_NAME, "*.safetensors", SAFETENSORS_INDEX_NAME, PYTORCH_NAME, *TOKENIZER_FILES]
# The dtypes a model loads in (transformers' `dtype` takes them as torch dtypes or by name).
FLOAT_DTYPES = {name: getattr(torch, name) for name in ("float32", "float16", "bfloat16", "float64")}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded into the requested model."""


def read_state_dict(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint directory, read without running any pickled code, and from files inside the
    directory only (a shard index naming `../x` is refused)."""
    directory = os.fspath(directory)
    if os.path.isfile(os.path.join(directory, SAFETENSORS_NAME)):
        return read_safetensors(os.path.join(directory, SAFETENSORS_NAME))
    index_path = os.path.join(directory, SAFETENSORS_INDEX_NAME)
    if os.path.isfile(index_path):
        state = {}
        for shard in shard_paths(index_path):
            state.update(read_safetensors(shard))
        return state
    pytorch_path = os.path.join(directory, PYTORCH_NAME)
    if os.path.isfile(pytorch_path):
        return read_pytorch_weights(pytorch_path)
    raise CheckpointError(
        f"no weights in {directory}: expected {SAFETENSORS_NAME}, {SAFETENSORS_INDEX_NAME} or {PYTORCH_NAME}"
    )


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """safetensors checks the header against the file (sizes, offsets, dtypes) before reading any tensor."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"cannot read safetensors weights {path}: {first_line(error)}") from None


def shard_paths(index_path: str) -> list[str]:
    """The shard files a safetensors index names, each a file inside the index's folder (symbolic links
    there are followed, as in the Hugging Face cache, whose snapshot files link to its blobs)."""
    try:
        with open(index_path, encoding="utf-8") as handle:
            shards = sorted(set(json.load(handle)["weight_map"].values()))
    except (OSError, KeyError, TypeError, AttributeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read {index_path}: {first_line(error)}") from None
    for shard in shards:
        if not isinstance(shard, str) or not stays_inside(shard):
            raise CheckpointError(f"{index_path} names the shard {shard!r}, which is not a file in its folder")
    return [os.path.join(os.path.dirname(index_path), shard) for shard in shards]


def read_pytorch_weights(pytorch_path: str) -> dict[str, torch.Tensor]:
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


def available_memory() -> int | None:
    """Bytes of memory the system can give without swapping (MemAvailable), else its free pages, else None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits_in_memory(config: ReformerConfig, config_path: str) -> None:
    """Refuse, before anything is allocated, a config whose weights alone (built in fp32, heads not counted)
    would not fit in the memory available: a hostile or mistyped config.json otherwise ends in the allocator's
    traceback, or in the machine swapping."""
    needed, available = 4 * config.base_parameter_count, available_memory()
    if available is not None and needed > available:
        raise CheckpointError(f"{config_path} describes a model of {config.base_parameter_count:,} parameters, whose "
                              f"fp32 weights need {needed / 2**30:,.1f} GiB; this machine has "
                              f"{available / 2**30:,.1f} GiB available")


def is_hub_id(text: str) -> bool:
    return HUB_ID.fullmatch(text) is not None


def download_checkpoint(hub_id: str) -> str:
    """The local snapshot (in huggingface_hub's cache) of the config, weights and tokenizer files of Hub model
    `hub_id`. Raises CheckpointError, in one line, when huggingface_hub is missing or cannot provide it."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"no model directory {hub_id}; Hugging Face Hub ids need huggingface_hub: "
                              "pip install huggingface_hub") from None
    try:
        return snapshot_download(hub_id, allow_patterns=HUB_CHECKPOINT_FILES)
    except Exception as error:  # huggingface_hub's errors (HTTP, cache, offline, proxy) share no narrower base
        raise CheckpointError(f"no model directory {hub_id}, and Hugging Face Hub model {hub_id} could not be "
                              f"fetched: {first_line(error)}") from None


def checkpoint_directory(path_or_id: str | os.PathLike) -> str:
    """A local directory as given (an existing one wins), else the snapshot of a Hub model id."""
    path = os.fspath(path_or_id)
    return download_checkpoint(path) if not os.path.isdir(path) and is_hub_id(path) else path


def requested_dtype(dtype, torch_dtype) -> torch.dtype | str:
    """What transformers' `dtype`, or `torch_dtype` (its older name), asks for: see parse_dtype; neither:
    float32."""
    given = {parse_dtype(value) for value in (dtype, torch_dtype) if value is not None}
    if len(given) > 1:
        raise ValueError(f"dtype {dtype!r} and torch_dtype {torch_dtype!r} differ: give one (torch_dtype is "
                         "dtype's older name)")
    return given.pop() if given else torch.float32


def parse_dtype(value) -> torch.dtype | str:
    """A FLOAT_DTYPES dtype, given as a torch.dtype or by name, or "auto" (see checkpoint_dtype)."""
    if value == "auto":
        return value
    resolved = FLOAT_DTYPES.get(value) if isinstance(value, str) else value
    if resolved not in FLOAT_DTYPES.values():
        raise ValueError(f"dtype {value!r} is not supported: give one of {', '.join(FLOAT_DTYPES)} (a torch.dtype "
                         "or its name) or 'auto'")
    return resolved


def checkpoint_dtype(config: ReformerConfig, state: dict[str, torch.Tensor]) -> torch.dtype:
    """transformers' "auto": the dtype config.json names (`dtype`, or `torch_dtype` as older transformers
    wrote it), else that of the first floating-point weight."""
    named = config.extra.get("dtype") or config.extra.get("torch_dtype")
    if named:
        return parse_dtype(named)
    return next((tensor.dtype for tensor in state.values() if tensor.is_floating_point()), torch.float32)


def requested_device(device_map, device) -> torch.device:
    """The one device that transformers' `device_map`, or `device`, names: see parse_device; neither: the
    CPU."""
    given = {parse_device(value) for value in (device_map, device) if value is not None}
    if len(given) > 1:
        raise ValueError(f"device_map {device_map!r} and device {device!r} differ: give one")
    return given.pop() if given else torch.device("cpu")


def parse_device(value) -> torch.device:
    """One device: "cpu", "cuda", "cuda:N", a torch.device, a GPU index, or "auto" (the GPU when torch sees
    one, else the CPU). A model is not split across devices."""
    if isinstance(value, dict):
        raise ValueError("device_map as a dict (the model split across devices) is not supported: give one "
                         "device, such as device_map='cuda'")
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(value)
    except (RuntimeError, TypeError):
        target = None
    if target is None or target.type not in ("cpu", "cuda"):
        raise ValueError(f"device {value!r} is not supported: give 'cpu', 'cuda', 'cuda:N', a GPU index or 'auto'")
    if target.type == "cuda" and (target.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {value!r} requested but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return target


class CheckpointMixin:
    """from_pretrained / save_pretrained for the Reformer model classes."""

    base_model_prefix: str

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, config: ReformerConfig | None = None, *, dtype=None,
                        torch_dtype=None, device_map=None, device=None, attn_implementation: str | None = None):
        """Load a directory written by `transformers` or by this project, or a Hugging Face Hub model id
        (namespace/name, see download_checkpoint; an existing directory of that name wins). Weights saved from
        a model with a head load into the base model (the head is dropped) and the other way round only for
        the base part. Keywords as in transformers: `dtype` (or `torch_dtype`), see requested_dtype;
        `device_map` (or `device`), one device, see requested_device; `attn_implementation`, see
        ReformerConfig (None: the config's). Returns the model in eval mode."""
        target_dtype = requested_dtype(dtype, torch_dtype)
        target_device = requested_device(device_map, device)
        directory = checkpoint_directory(path_or_id)
        if not os.path.isdir(directory):
            raise CheckpointError(f"model directory {directory} does not exist")
        if config is None:
            try:
                config = ReformerConfig.from_pretrained(directory)
            except ConfigError as error:
                raise CheckpointError(str(error)) from None
        if attn_implementation is not None:
            config = dataclasses.replace(config, attn_implementation=attn_implementation)
        check_fits_in_memory(config, os.path.join(directory, CONFIG_NAME))
        model = cls(config)
        state = read_state_dict(directory)
        model.load_checkpoint_state(state)
        if target_dtype == "auto":
            target_dtype = checkpoint_dtype(config, state)
        return model.to(device=target_device, dtype=target_dtype).eval()

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


"""Running exported Reformer graphs with ONNX Runtime, for applications: numpy and onnxruntime only (text in and
out: the `text` extra's tokenizers and sentencepiece, see reformer/tokenizer.py).

- `OnnxModel(path)`: one exported task graph (`reformer-export --format onnx`); call it with token ids and an
  optional mask (or text, where the graph carries its checkpoint's tokenizer), get the task's named outputs as
  arrays.
- `OnnxGenerator(directory)`: text generation over the prefill and decoder-step graphs that
  `reformer-export --task causal-lm-with-past` writes (see exporters/decoder.py for the directory layout), with
  the options and prompt batches of eager `reformer.generation.generate`, whose loop (`reformer.sampling`) it
  runs: `generate` returns the sequences, `stream` yields each step's tokens as they come, `generate_text` takes
  and returns text.
  On CUDA the cache stays on the device between steps (IO binding); only the last logits come to the host.

The same calls on a model served by Triton Inference Server: `exporters.triton.client.TritonModel`.

Providers default to CUDA (when this onnxruntime build has it) then CPU. ONNX Runtime silently falls back to
the CPU when CUDA cannot load: `providers_in_use` says what a session really runs on.

Sessions (`open_session`, which both classes use) get every optimisation (ORT_ENABLE_ALL), keep ONNX Runtime's
CPU arena, go without its memory patterns and planned buffer reuse, let idle intra-op threads sleep instead
of spinning (open_session's comments have the measurements), and on CUDA the options of
`cuda_provider_options`: an arena that grows by what a run asks for, strict fp32 matmuls as eager PyTorch
computes them (`tf32=True` allows TF32), copies on the compute stream. An arena keeps the most any run needed
until its session ends; with `shrink_arena=True` the classes hand back what no tensor uses after each run that
can grow it (every `OnnxModel` call, the generator's prefills), for an app that serves a rare long input.

CUDA graphs (ONNX Runtime's `enable_cuda_graph`) are not offered: a captured graph replays the shapes and
device addresses it was captured with, and the decoder step's cache grows by one position every step (only a
step graph over a fixed-size cache could be captured). `OnnxModel` on CUDA runs without IO binding: it
returns host arrays, so its outputs are copied to the host either way.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Iterator, Sequence

import numpy as np
import onnxruntime

from .file_checks import check_external_data, check_graph, read_decoder_description
from .sampling import Prompts, TokenChooser, generation_steps
from .tokenizer import (
    Tokenizer,
    files_from_metadata,
    is_text,
    load_tokenizer,
    prompt_ids,
    text_generation,
    tokenizer_from_files,
)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
# Task graphs may also output each LSH layer's buckets, for verification: `buckets_0`, `buckets_1`, ...
BUCKET_OUTPUT = re.compile(r"buckets_\d+")


def default_providers() -> list[str]:
    """CUDA then CPU where this onnxruntime build has CUDA and the machine has an NVIDIA GPU, else CPU (a GPU
    build lists CUDA even without a GPU, and then logs errors on every session it falls back for)."""
    available = onnxruntime.get_available_providers()
    return [CUDA, CPU] if CUDA in available and nvidia_gpu_present() else [CPU]


def nvidia_gpu_present() -> bool:
    if os.name == "nt":  # no /proc or /dev to look at: trust the build
        return True
    return os.path.exists("/dev/nvidia0") or bool(os.listdir("/proc/driver/nvidia/gpus")
                                                   if os.path.isdir("/proc/driver/nvidia/gpus") else [])


def cuda_provider_options(tf32: bool = False) -> dict[str, str]:
    """The CUDA execution provider's options that matter for these graphs, as the strings ONNX Runtime takes.
    Convolution options (cudnn_conv_algo_search, ...) are left alone: the graphs have no convolutions."""
    return {
        # The default, kNextPowerOfTwo, doubles the arena (42-52 GiB on an H200 at 65K tokens where eager peaks
        # at 6.5-12 GiB) and never shrinks its first region; this grows it by each request, all shrinkable.
        "arena_extend_strategy": "kSameAsRequested",
        # ONNX Runtime's CUDA default is TF32 matmuls, eager PyTorch's is strict fp32: strict unless asked.
        "use_tf32": "1" if tf32 else "0",
        # Host-device copies on the compute stream, ordered with the kernels (ONNX Runtime's advice; 0 races).
        "do_copy_in_default_stream": "1",
    }


def with_provider_options(providers: Sequence, tf32: bool = False) -> list:
    """`providers` (names, or (name, options) pairs) with CUDA given `cuda_provider_options(tf32)` under the
    caller's own options, which win; other providers as given (the CPU provider takes no CUDA options)."""
    expanded = []
    for provider in providers:
        name, options = (provider, {}) if isinstance(provider, str) else provider
        expanded.append((name, {**cuda_provider_options(tf32), **options}) if name == CUDA else provider)
    return expanded


def open_session(path: str | os.PathLike, providers: Sequence | None = None, quiet: bool = False,
                 threads: int | None = None, tf32: bool = False,
                 profile_prefix: str | None = None) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session on `providers` (names, or (name, options) pairs; default `default_providers()`),
    for a graph whose external data lie in its folder (reformer.file_checks.check_external_data: ModelFileError),
    CUDA with `cuda_provider_options(tf32)` under any options given. quiet: errors only, for callers that
    report a provider that could not start themselves; threads: intra-op threads (None: one per core);
    profile_prefix: write ONNX Runtime's profile of every run (`session.end_profiling()` names the file)."""
    check_external_data(path)
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    # No memory pattern: ONNX Runtime plans one after a run for the shapes it saw and from then on allocates all
    # of that run's tensors as one block, without the reuse of freed buffers it does otherwise. The `small`
    # benchmark model at 16,384 tokens (CPU, 2 threads) peaked at 0.37 GiB without it, and with it at 0.37 on
    # the first run and 0.65 on every later one; 4,096-token forwards took as long either way (265 and 267
    # ms, one thread). The arena stays: without it the same forwards peaked at 0.53 GiB.
    options.enable_mem_pattern = False
    options.enable_cpu_mem_arena = True
    # No planned reuse: ONNX Runtime's planner gives an output the freed buffer of an earlier one of exactly the
    # same size, and a buffer is released only after the last tensor placed in it, so reuse chains span the
    # forward and each tensor size keeps as many buffers as it ever had live at once, at peaks that never
    # coincide. The `small` model at 65,536 tokens (CPU, 2 threads) peaked at 1.24 GiB with it and 0.80
    # without, where the tensors live at once in ONNX Runtime's execution order never exceed 0.48 GiB; the
    # arena's reuse of freed blocks serves every size instead. At 4,096 tokens forwards took as long either
    # way (interleaved, 1 thread: fp32 810 and 791 ms, int8 396 and 386 ms; byte-lm generation the same).
    options.enable_mem_reuse = False
    # Idle intra-op threads sleep instead of spinning. With two threads on a 2-core machine shared with other
    # work, spinning workers fight the main thread and the other processes for the cores: the int8 `small`
    # graph at 4,096 tokens took 146-150 ms spinning and 103-127 ms not (fp32: 205 against 194-230 ms).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if quiet:
        options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return onnxruntime.InferenceSession(os.fspath(path), options,
                                        providers=with_provider_options(providers or default_providers(), tf32))


def shrink_arena_run_options(session: onnxruntime.InferenceSession) -> onnxruntime.RunOptions:
    """Run options that make `session` hand back, after the run, the arena regions no tensor uses any more:
    the CPU arena's, and the CUDA device's where the session runs on CUDA (naming an arena the session lacks
    is an error, so this asks the session, which may have fallen back to the CPU). The next long run
    allocates again."""
    arenas = ["cpu:0"]
    if CUDA in session.get_providers():
        arenas.append(f"gpu:{session.get_provider_options()[CUDA]['device_id']}")
    run_options = onnxruntime.RunOptions()
    run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", ";".join(arenas))
    return run_options


def pad_batch(input_ids, attention_mask=None, pad_token_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """ids as a B, L array or a ragged list of lists -> (ids, mask), both int64 B, L. Ragged rows are padded at
    the end with pad_token_id and masked out; a given mask must have the ids' shape (or rows' lengths)."""
    if isinstance(input_ids, np.ndarray):
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be 2-D (batch, sequence), got shape {input_ids.shape}")
        ids = input_ids.astype(np.int64)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {mask.shape}, input_ids have {ids.shape}")
        return ids, mask
    rows = [list(row) for row in input_ids]
    if not rows or any(len(row) == 0 for row in rows):
        raise ValueError("input_ids must hold at least one row, and every row at least one token")
    masks = [[1] * len(row) for row in rows] if attention_mask is None else [list(row) for row in attention_mask]
    if [len(row) for row in masks] != [len(row) for row in rows]:
        raise ValueError("attention_mask rows must have the lengths of the input_ids rows")
    length = max(len(row) for row in rows)
    ids = np.full((len(rows), length), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(rows), length), dtype=np.int64)
    for index, (row, row_mask) in enumerate(zip(rows, masks)):
        ids[index, : len(row)] = row
        mask[index, : len(row)] = row_mask
    return ids, mask


class OnnxModel:
    """An exported task graph (inputs `input_ids`, `attention_mask`; outputs by name)."""

    def __init__(self, path: str | os.PathLike, providers: Sequence | None = None, pad_token_id: int = 0,
                 bucket_outputs: bool = False, tf32: bool = False, threads: int | None = None,
                 shrink_arena: bool = False):
        """providers, tf32, threads: as for `open_session`; bucket_outputs: also return the LSH layers' buckets
        (`buckets_<i>`), where the graph has them; shrink_arena: after each call, hand back the arena memory
        that call grew and no longer uses (see `shrink_arena_run_options`)."""
        self.session = open_session(path, providers, threads=threads, tf32=tf32)
        self.run_options = shrink_arena_run_options(self.session) if shrink_arena else None
        self.input_names = [graph_input.name for graph_input in self.session.get_inputs()]
        self.output_names = [output.name for output in self.session.get_outputs()
                             if bucket_outputs or not BUCKET_OUTPUT.fullmatch(output.name)]
        # Padding is masked out, so its id changes no output at a real position.
        self.pad_token_id = pad_token_id
        self.path = os.fspath(path)

    @functools.cached_property
    def tokenizer(self) -> Tokenizer | None:
        """The tokenizer the graph carries in its metadata (exports of checkpoints with tokenizer files), None
        when it carries none (a byte-vocabulary graph: use reformer.tokenizer.ByteTokenizer). Read on first use,
        so that graphs run without the `text` extra's libraries."""
        metadata = self.session.get_modelmeta().custom_metadata_map
        return tokenizer_from_files(files_from_metadata(metadata), None, self.path)

    @property
    def providers_in_use(self) -> list[str]:
        return self.session.get_providers()

    def __call__(self, input_ids, attention_mask=None) -> dict[str, np.ndarray]:
        """input_ids: int array B, L or a list of token-id lists (ragged rows are padded for you), or a text or
        list of texts for a graph that carries its tokenizer; attention_mask: same shape, 1 for real tokens
        (None: all real). Returns {output name: array}; outputs at padded positions are not defined."""
        if is_text(input_ids):
            input_ids = prompt_ids(self.tokenizer, input_ids)
        ids, mask = pad_batch(input_ids, attention_mask, self.pad_token_id)
        feeds = {"input_ids": ids, "attention_mask": mask}
        outputs = self.session.run(self.output_names, {name: feeds[name] for name in self.input_names},
                                   self.run_options)
        return dict(zip(self.output_names, outputs))


class OnnxGenerator:
    """Generation over an exported causal-lm-with-past directory (a `reformer.sampling.CachedDecoding`)."""

    def __init__(self, directory: str | os.PathLike, providers: Sequence | None = None,
                 io_binding: bool | None = None, tf32: bool = False, threads: int | None = None,
                 shrink_arena: bool = False):
        """providers, tf32, threads: as for `open_session`; io_binding: keep the cache in the session's device
        memory between steps (None: on CUDA only); shrink_arena: after each prefill (a long prompt's run),
        hand back the arena memory it grew and no longer uses (see `shrink_arena_run_options`). Steps keep
        theirs: a shrink after each would free and allocate again for every token."""
        self.directory = os.fspath(directory)
        self.description = read_decoder_description(directory)
        self.sessions = {}
        for kind, file in self.description["files"].items():
            path = os.path.join(directory, file)
            self.sessions[kind] = open_session(path, providers, threads=threads, tf32=tf32)
            check_graph(self.sessions[kind], self.description, kind, path)
        self.run_options = {kind: shrink_arena_run_options(session) if shrink_arena and kind == "prefill" else None
                            for kind, session in self.sessions.items()}
        self.device = "cuda" if CUDA in self.sessions["step"].get_providers() else "cpu"
        self.io_binding = self.device == "cuda" if io_binding is None else io_binding
        self.vocab_size = self.description["vocab_size"]
        self.max_length = self.description["max_length"]
        self.max_length_name = "the export's max_length"
        self.cache_tensors = {name: self.description["cache_tensors"][name] for name in self.description["cache"]}

    @property
    def providers_in_use(self) -> list[str]:
        return self.sessions["step"].get_providers()

    @functools.cached_property
    def tokenizer(self) -> Tokenizer | None:
        """The model's tokenizer (reformer.tokenizer.load_tokenizer): the tokenizer files the export carries
        beside decoder_config.json, else the byte tokenizer for a byte vocabulary, else None. Read on first use,
        so that exports run as token ids without the `text` extra's libraries."""
        return load_tokenizer(self.directory, self.vocab_size)

    def generate_text(self, prompts, max_new_tokens: int, **options) -> str | list[str]:
        """Text in, text out: each prompt (a text, or a list of texts of any lengths) followed by up to
        `max_new_tokens` generated tokens' text, up to the `eos_token_id` where given; options as for
        `generate`. reformer.tokenizer.TokenizerError when the export has no usable tokenizer."""
        return text_generation(self.generate, self.tokenizer, prompts, max_new_tokens, options)

    def generate(self, input_ids, max_new_tokens: int, attention_mask=None, **options) -> np.ndarray:
        """The prompts followed by up to `max_new_tokens` new tokens: int64 B, T + new tokens.

        input_ids: an int array B, T, left-padded where `attention_mask` (B, T, 1 for prompt tokens) has zeros,
        or a list of token-id lists of any lengths (left-padded for you with the pad token). Each row's new
        tokens are those of generating it alone (up to sampling, which draws for all rows from one generator).
        options, as for eager `reformer.generation.generate` (`reformer.sampling.TokenChooser`): do_sample
        (default greedy), temperature, top_k, top_p, seed, repetition_penalty, eos_token_id (a row that produced
        it continues with pad_token_id, by default the model's; generation stops early when every row has),
        pad_token_id. A prompt plus new tokens may need at most the export's `max_length` positions."""
        prompts, choose = self.start_generation(input_ids, attention_mask, options)
        steps = list(generation_steps(self, prompts, choose, max_new_tokens))
        return np.concatenate([prompts.ids, np.stack(steps, axis=1)], axis=1)

    def stream(self, input_ids, max_new_tokens: int, attention_mask=None, **options) -> Iterator[np.ndarray]:
        """The new tokens as they come: one int64 array B per step; arguments as for `generate`, checked at
        once. Stopping the iteration stops generation."""
        prompts, choose = self.start_generation(input_ids, attention_mask, options)
        return generation_steps(self, prompts, choose, max_new_tokens)

    def start_generation(self, input_ids, attention_mask, options: dict) -> tuple[Prompts, TokenChooser]:
        choose = TokenChooser.from_options(options, self.description["pad_token_id"])
        return Prompts.from_inputs(input_ids, attention_mask, choose.pad_token_id), choose

    def next_token_logits(self, kind: str, input_ids: np.ndarray, past: list) -> tuple[np.ndarray, list]:
        logits, present = self.run(kind, input_ids, past)
        return logits[:, -1], present

    def cache_to_host(self, cache: list) -> list[np.ndarray]:
        return [value.numpy() for value in cache] if self.io_binding else cache

    def cache_from_host(self, arrays: list[np.ndarray]) -> list:
        if not self.io_binding:
            return arrays
        return [onnxruntime.OrtValue.ortvalue_from_numpy(array, self.device) for array in arrays]

    def run(self, kind: str, input_ids: np.ndarray, past: list) -> tuple[np.ndarray, list]:
        """One graph: (logits as a host array, present cache). The cache is numpy arrays without IO binding,
        and OrtValues left in the device's memory with it."""
        session, names, run_options = self.sessions[kind], self.description[kind], self.run_options[kind]
        if not self.io_binding:
            outputs = session.run(None, dict(zip(names["inputs"], [input_ids, *past])), run_options)
            return outputs[0], outputs[1:]
        binding = session.io_binding()
        binding.bind_cpu_input("input_ids", input_ids)
        for name, value in zip(names["inputs"][1:], past):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in names["outputs"][1:]:
            binding.bind_output(name, self.device)
        session.run_with_iobinding(binding, run_options)
        outputs = binding.get_outputs()
        return outputs[0].numpy(), outputs[1:]

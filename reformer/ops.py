"""The few operations whose lowering the exporters choose (see `exporters/ops`).

Each function here is the one definition of the op's math: eager PyTorch runs it as written, TorchScript
keeps it as plain ATen ops, and the ONNX exporter may swap in a specialised lowering with this as fallback.
The exporter swaps through `replaced`, which acts in the current thread (or asyncio task) only: another
thread running or exporting a model meanwhile keeps its own choice.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Callable, Iterator, Mapping

import torch

# Names of the functions `replaced` may route elsewhere.
REPLACEABLE: set[str] = set()
# The current context's replacements by function name (None: none).
_replacements: contextvars.ContextVar[Mapping[str, Callable] | None] = contextvars.ContextVar(
    "reformer_ops_replacements", default=None)


def replaceable(function: Callable) -> Callable:
    """Make `function` one that `replaced` can route elsewhere; otherwise it runs as written."""
    name = function.__name__
    REPLACEABLE.add(name)

    @functools.wraps(function)
    def dispatch(*arguments, **keywords):
        replacements = _replacements.get()
        chosen = function if replacements is None else replacements.get(name, function)
        return chosen(*arguments, **keywords)

    return dispatch


@contextlib.contextmanager
def replaced(replacements: Mapping[str, Callable]) -> Iterator[None]:
    """Within, in this thread (or asyncio task) only: calls of the functions named in `replacements` go to
    their replacement; nested, they add to (or override) the outer replacements."""
    unknown = sorted(set(replacements) - REPLACEABLE)
    if unknown:
        raise ValueError(f"reformer.ops has no replaceable function {', '.join(unknown)}")
    token = _replacements.set({**(_replacements.get() or {}), **replacements})
    try:
        yield
    finally:
        _replacements.reset(token)


@replaceable
def sort_by_bucket(buckets: torch.Tensor) -> torch.Tensor:
    """Positions in bucket order, ties broken by position (a stable sort). buckets: ..., L -> ..., L.

    The key `bucket * L + position` is unique, so any sort, ONNX `TopK` included, gives the stable order."""
    length = buckets.shape[-1]
    positions = torch.arange(length, device=buckets.device)
    return torch.argsort(buckets * length + positions, dim=-1)


@replaceable
def invert_permutation(permutation: torch.Tensor) -> torch.Tensor:
    """Inverse of permutations along the last axis: result[..., permutation[..., i]] = i."""
    positions = torch.arange(permutation.shape[-1], device=permutation.device).expand_as(permutation)
    return torch.empty_like(permutation).scatter(-1, permutation, positions)


@replaceable
def attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor, scale: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """softmax(scale * query key^T + bias) value, within chunks: query B, H, K, S, D; key and value
    B, H, K, T, D; bias broadcast to B, H, K, S, T -> B, H, K, S, D. Dropout (training only) acts on the
    probabilities; exported graphs are for inference and have none."""
    # The scores are not kept in a name: eager frees them once softmax has written the probabilities.
    probs = torch.softmax(torch.matmul(query, key.transpose(-1, -2)) * scale + bias, dim=-1)
    return torch.matmul(torch.nn.functional.dropout(probs, p=dropout, training=dropout > 0), value)


@replaceable
def project_heads_into_chunks(hidden_states: torch.Tensor, weight: torch.Tensor, num_heads: int, chunk_length: int
                              ) -> torch.Tensor:
    """hidden_states B, L, hidden through a bias-free projection (weight H*D, hidden), split into heads and
    chunks: B, H, K, C, D (L a multiple of C). Eager views the projection; ONNX has no views, so its lowering
    multiplies by each head's rows at once instead of transposing the projection afterwards."""
    batch, head_size = hidden_states.shape[0], weight.shape[0] // num_heads
    projected = torch.nn.functional.linear(hidden_states, weight)  # B, L, H*D
    # Splitting before transposing keeps every view of a contiguous tensor, which torch.export can check for
    # any K.
    return projected.view(batch, -1, chunk_length, num_heads, head_size).permute(0, 3, 1, 2, 4)


@replaceable
def attend_with_log_normalizer(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor, not_self: torch.Tensor,
    mask_value: float, self_mask_value: float, dropout: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared query-key attention within chunks with the masks applied as the reference applies them, and the
    log-sum-exp of each query's masked scores (LSH combines hashing rounds with it). query B, H, K, S, D; key
    and value B, H, K, T, D (keys already scaled); allowed and not_self (bool) broadcast to B, H, K, S, T.
    Scores take `mask_value` where a key is not allowed and `self_mask_value` where it is the query itself
    (Reformer paper, section 2: a token attends to itself only when nothing else is allowed). Returns out
    B, H, K, S, D and the log-sum-exp B, H, K, S.

    The score tensor is the largest the model writes, so it is written as few times as possible: scores,
    masked scores, probabilities (one softmax, an op runtimes have fast kernels for). The log-sum-exp comes
    from what is already there, max(scores) - log(max(probabilities)), since the largest probability is
    exp(max - log-sum-exp); it is at least 1/T, so its logarithm loses nothing."""
    scores = torch.where(allowed, torch.matmul(query, key.transpose(-1, -2)), mask_value)
    scores = torch.where(not_self, scores, self_mask_value)
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(torch.nn.functional.dropout(probs, p=dropout, training=dropout > 0), value)
    return out, torch.amax(scores, dim=-1) - torch.log(torch.amax(probs, dim=-1))

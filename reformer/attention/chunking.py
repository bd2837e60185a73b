"""Shape helpers shared by LSH and local attention.

Dimension letters used in every shape comment of this package:
    B batch, H heads, L (padded) sequence length, C chunk length, D head size, N hashing rounds,
    K number of chunks, W keys a chunk attends to = C * (1 + chunks before + chunks after).
Tensors in bucket order carry the prefix `sorted_`.
"""

from __future__ import annotations

import torch

# Mask values of the reference, per dtype: -1e9 does not fit in fp16.
MASK_VALUE = {torch.float16: -1e4, torch.bfloat16: -1e9, torch.float32: -1e9, torch.float64: -1e9}
SELF_MASK_VALUE = {torch.float16: -1e3, torch.bfloat16: -1e5, torch.float32: -1e5, torch.float64: -1e5}


def split_heads(x: torch.Tensor, num_heads: int, head_size: int) -> torch.Tensor:
    """B, L, H*D -> B, H, L, D"""
    batch, length, _ = x.shape
    return x.view(batch, length, num_heads, head_size).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """B, H, L, D -> B, L, H*D"""
    batch, heads, _, head_size = x.shape
    return x.transpose(1, 2).reshape(batch, -1, heads * head_size)


def split_chunks(x: torch.Tensor, chunk_length: int) -> torch.Tensor:
    """B, H, L, ... -> B, H, K, C, ... for a contiguous x (L must be a multiple of C)."""
    return x.view(x.shape[0], x.shape[1], -1, chunk_length, *x.shape[3:])


def split_heads_into_chunks(x: torch.Tensor, num_heads: int, head_size: int, chunk_length: int) -> torch.Tensor:
    """B, L, H*D -> B, H, K, C, D. Splitting before transposing keeps every view of a contiguous tensor,
    which torch.export can check for any K."""
    batch = x.shape[0]
    return x.view(batch, -1, chunk_length, num_heads, head_size).permute(0, 3, 1, 2, 4)


def length_as_tensor(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x.shape[dim] as a 1-element int64 tensor: exporters lower tensor arithmetic on it (e.g. tensor %
    tensor), not on a SymInt."""
    return torch.arange(x.shape[dim], device=x.device)[-1:] + 1


def look_adjacent(x: torch.Tensor, chunks_before: int, chunks_after: int) -> torch.Tensor:
    """B, H, K, C, ... -> B, H, K, W, ...: each chunk followed by its neighbours, wrapping around the K axis
    (the reference's order, which matters for float rounding only). Indexing modulo K rather than slicing
    keeps the graph valid for every K, including K smaller than the number of neighbours."""
    if chunks_before == 0 and chunks_after == 0:
        return x
    chunk_index = torch.arange(x.shape[2], device=x.device)
    num_chunks = length_as_tensor(x, 2)  # K
    neighbours = [
        x.index_select(2, torch.remainder(chunk_index + offset, num_chunks))
        for offset in range(-chunks_before, chunks_after + 1)
    ]
    return torch.cat(neighbours, dim=3)


def length_normalize(x: torch.Tensor, epsilon: float = 1e-6) -> torch.Tensor:
    """Scale each vector to unit root-mean-square (shared query-key attention normalises its keys)."""
    return x * torch.rsqrt(torch.mean(x * x, dim=-1, keepdim=True) + epsilon)


def masked_softmax_attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    allowed: torch.Tensor,
    not_self: torch.Tensor | None,
    dropout: float,
    training: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention inside chunks. query B, H, K, C, D; key and value B, H, K, W, D; allowed (and not_self,
    for shared query-key attention) broadcast to B, H, K, C, W. Returns out B, H, K, C, D and the
    log-sum-exp of the scores B, H, K, C (LSH combines hashing rounds with it)."""
    scores = torch.matmul(query, key.transpose(-1, -2))
    scores = scores.masked_fill(~allowed, MASK_VALUE[scores.dtype])
    if not_self is not None:
        # A token may attend to itself only when nothing else is allowed (Reformer paper, section 2).
        scores = scores.masked_fill(~not_self, SELF_MASK_VALUE[scores.dtype])
    log_normalizer = torch.logsumexp(scores, dim=-1, keepdim=True)
    probs = torch.exp(scores - log_normalizer)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=training)
    return torch.matmul(probs, value), log_normalizer.squeeze(-1)

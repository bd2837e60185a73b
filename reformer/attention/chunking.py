"""Shape helpers shared by LSH and local attention.

Dimension letters used in every shape comment of this package:
    B batch, H heads, L (padded) sequence length, C chunk length, D head size, N hashing rounds,
    K number of chunks, W keys a chunk attends to = C * (1 + chunks before + chunks after).
Tensors in bucket order carry the prefix `sorted_`.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops

# Mask values of the reference, per dtype: -1e9 does not fit in fp16.
MASK_VALUE = {torch.float16: -1e4, torch.bfloat16: -1e9, torch.float32: -1e9, torch.float64: -1e9}
SELF_MASK_VALUE = {torch.float16: -1e3, torch.bfloat16: -1e5, torch.float32: -1e5, torch.float64: -1e5}


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """B, H, L, D -> B, L, H*D"""
    batch, heads, _, head_size = x.shape
    return transposed_copy(x).view(batch, -1, heads * head_size)


def transposed_copy(x: torch.Tensor) -> torch.Tensor:
    """B, M, N, ... -> B, N, M, ..., contiguous, by a copy that asks nothing about the layout (the copy a
    reshape of the transposed tensor makes anyway): torch.export guards a dynamic size against 1 where it checks
    a transposed tensor's contiguity or whether it can be viewed (or a permuted 4-d tensor's channels-last
    strides), and a graph whose padded length may be 1 (chunk length 1) then failed to export."""
    return x.transpose(1, 2).clone(memory_format=torch.contiguous_format)


def split_chunks(x: torch.Tensor, chunk_length: int) -> torch.Tensor:
    """B, H, L, ... -> B, H, K, C, ... for a contiguous x (L must be a multiple of C)."""
    return x.view(x.shape[0], x.shape[1], -1, chunk_length, *x.shape[3:])


def length_as_tensor(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x.shape[dim] as a 1-element int64 tensor: exporters lower tensor arithmetic on it (e.g. tensor %
    tensor), not on a SymInt."""
    return torch.arange(x.shape[dim], device=x.device)[-1:] + 1


def look_adjacent(x: torch.Tensor, chunks_before: int, chunks_after: int) -> torch.Tensor:
    """B, H, K, C, ... -> B, H, K, W, ...: each chunk followed by its neighbours, wrapping around the K axis
    (the reference's order, which matters for float rounding only). One gather of the K axis by a
    K x (1 + before + after) index writes the result once, where concatenating shifted copies wrote it twice;
    indexing modulo K keeps the graph valid for every K, including K smaller than the number of neighbours."""
    if chunks_before == 0 and chunks_after == 0:
        return x
    chunk_index = torch.arange(x.shape[2], device=x.device)
    offsets = torch.arange(-chunks_before, chunks_after + 1, device=x.device)
    neighbours = torch.remainder(chunk_index[:, None] + offsets, length_as_tensor(x, 2))  # K, 1+before+after
    adjacent = x.index_select(2, neighbours.flatten())  # B, H, K*(1+before+after), C, ...
    return adjacent.view(x.shape[0], x.shape[1], x.shape[2], -1, *x.shape[4:])


def length_normalize(x: torch.Tensor, scale: float = 1.0, epsilon: float = 1e-6) -> torch.Tensor:
    """Scale each vector to unit root-mean-square, times `scale` (shared query-key attention normalises its
    keys, then divides them by sqrt(D)); the scale goes on the per-vector factor, not on every element, and the
    mean square comes from the vector norm, which needs no squared copy of x (one ReduceL2 in ONNX)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    mean_square = norm * norm / x.shape[-1]  # a Mul, where square() is a Pow (slower in ONNX Runtime)
    return x * (torch.rsqrt(mean_square + epsilon) * scale)


def masked_softmax_attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    allowed: torch.Tensor,
    not_self: torch.Tensor | None,
    dropout: float,
    training: bool,
    with_log_normalizer: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention inside chunks, masks applied as the reference applies them (the masked scores take the mask
    values exactly). query B, H, K, C, D; key and value B, H, K, W, D; allowed (and not_self, for shared
    query-key attention) broadcast to B, H, K, C, W. Returns out B, H, K, C, D and, when asked (LSH combines
    hashing rounds with it; shared query-key attention only), the log-sum-exp of the scores B, H, K, C, from
    the registered op `ops.attend_with_log_normalizer`, whose ONNX lowering the exporter chooses."""
    dtype = query.dtype
    if with_log_normalizer:
        return ops.attend_with_log_normalizer(query, key, value, allowed, not_self, mask_value=MASK_VALUE[dtype],
                                              self_mask_value=SELF_MASK_VALUE[dtype],
                                              dropout=dropout if training else 0.0)
    scores = mask_scores(torch.matmul(query, key.transpose(-1, -2)), allowed, not_self, dtype)
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(torch.nn.functional.dropout(probs, p=dropout, training=training), value), None


def mask_scores(scores: torch.Tensor, allowed: torch.Tensor, not_self: torch.Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:
    """Scores with the reference's masking: the mask values of the model's `dtype` where a key is not allowed,
    and, where given, the self-mask value where a key is the query itself (Reformer paper, section 2: a token
    attends to itself only when nothing else is allowed). Eager broadcasts whole masks; FlexAttention calls it
    per score."""
    scores = torch.where(allowed, scores, MASK_VALUE[dtype])
    if not_self is None:
        return scores
    return torch.where(not_self, scores, SELF_MASK_VALUE[dtype])


def mask_bias(allowed: torch.Tensor, dtype: torch.dtype, is_self: torch.Tensor | None = None) -> torch.Tensor:
    """A mask to add to scores: 0 where allowed, the mask value elsewhere, and, where is_self is given, the
    self-mask value where a key is the query itself. Adding gives the reference's softmax exactly in every row
    with an allowed key or with itself (exp(mask value + score - row maximum) is 0 either way), and is one
    broadcast add where masking is a select.
    Built by multiplying 0/1 casts of the masks, not by selecting: ONNX Runtime CPU runs `Where` on one thread
    (for `small` at 4,096 tokens and 2 threads, 1.8 to 2.9 ms for each full-size select of an LSH layer, where
    a cast or a product takes about 0.3 ms). Exact: 1 * value is the value, 0 * value is -0.0, which adds
    nothing, and each position gets at most one mask value."""
    blocked = ~allowed if is_self is None else ~(allowed | is_self)
    bias = blocked.to(dtype).mul_(MASK_VALUE[dtype])  # in place: eager holds one full-size float, not two
    if is_self is None:
        return bias
    return bias.add_(is_self.to(dtype) * SELF_MASK_VALUE[dtype])


class ChunkedSelfAttention(nn.Module):
    """What LSH and local self-attention share: the heads, the chunks a query sees, causality, dropout and the
    attention implementation, read from the config's settings of their `kind` ("lsh" or "local", the prefix
    of transformers' names for them)."""

    def __init__(self, config, kind: str):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_size = config.attention_head_size
        self.chunk_length = getattr(config, f"{kind}_attn_chunk_length")
        self.chunks_before = getattr(config, f"{kind}_num_chunks_before")
        self.chunks_after = getattr(config, f"{kind}_num_chunks_after")
        self.dropout = getattr(config, f"{kind}_attention_probs_dropout_prob")
        self.is_decoder = config.is_decoder
        self.attn_implementation = config.attn_implementation

    def head_projection(self, config) -> nn.Linear:
        """A bias-free projection of the hidden states to every head."""
        return nn.Linear(config.hidden_size, self.num_heads * self.head_size, bias=False)

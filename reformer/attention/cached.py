"""One decoding step of LSH and local attention against cached past states, with static shapes.

The cache holds, per layer, the layer-normed attention inputs of every past position (B, Lp, hidden) and,
per LSH layer, their buckets (B, H, N, Lp), as the reference's `past_buckets_states` does. A new token
attends to a fixed number S of key slots, so one exported graph serves every past length Lp:

- LSH: in each hashing round the new token joins the past tokens in bucket order (the stable sort of
  `ops.sort_by_bucket`); it attends to the W = (1 + before + after) * C positions of bucket order starting at
  the chunk before its own, wrapping modulo L = Lp + 1 (the reference's `_expand_to_indices_in_relevant_chunk`).
  Where that window is found with `argmax`, not `nonzero`. Until the reference first hashes (a prompt short
  enough for its unchunked path, see `lsh_unchunked_until`), it instead attends once to every position.
- local: the new token attends to the positions from the start of the chunk `before` chunks ahead of the one
  its past length falls in, up to itself (the reference's `_retrieve_relevant_hidden_states`).

A row may start after `left_padding` positions of filler (prompts of different lengths in one batch, see
`reformer.generation`): positions, chunks, the bucket order's wrap-around and the window are then those of the
row's own L - left_padding positions, so the row attends exactly as it would alone; padding holds the padding
bucket, which sorts after every real one, so it is never in a row's window.

Unused slots are masked; they add exact zeros to the softmax. Shape letters as in `chunking.py`, plus
S key slots; the single new position is written as 1.
"""

from __future__ import annotations

import math

import torch

from .. import ops
from .chunking import ChunkedSelfAttention, length_as_tensor, length_normalize, masked_softmax_attend
from .local import LocalSelfAttention
from .lsh import LSHSelfAttention, combine_rounds


def per_head_weight(linear: torch.nn.Linear, heads: int) -> torch.Tensor:
    """A bias-free projection's weight as each head's rows: H, hidden, D."""
    return linear.weight.view(heads, -1, linear.weight.shape[-1]).transpose(1, 2)


def merge_token_heads(x: torch.Tensor) -> torch.Tensor:
    """B, H, 1, D (or B, H, D) -> B, 1, H*D (chunking.merge_heads for the new token): with one position the
    heads already lie in merged order, so a reshape does it, without a transposed copy."""
    return x.reshape(x.shape[0], 1, -1)


def project_per_head(states: torch.Tensor, weight: torch.Tensor, rounds: int) -> torch.Tensor:
    """states B, H, N*S, hidden picked separately per head -> B, H, N, S, D through that head's rows of a
    bias-free projection (weight H, hidden, D: per_head_weight; the reference's `_query_per_attn_head`)."""
    return torch.matmul(states, weight).view(states.shape[0], states.shape[1], rounds, -1, weight.shape[-1])


def gather_rows(states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """states B, L, hidden; positions B, ... -> the rows at those positions, B, ..., hidden. One gather of rows
    by a flat index (b * L + position): an element-wise gather needs an index as large as its output, which
    the step graph would build and read for every token."""
    batch, length = states.shape[0], length_as_tensor(states, 1)
    row_start = torch.arange(batch, device=positions.device).view(-1, *[1] * (positions.dim() - 1)) * length
    index = row_start + positions  # B, ...
    return states.reshape(-1, states.shape[-1]).index_select(0, index.flatten()).view(*positions.shape, -1)


def chunks_ahead_start(attention: ChunkedSelfAttention, position: torch.Tensor) -> torch.Tensor:
    """The start of the chunk `chunks_before` chunks ahead of the one an int64 position falls in (negative near
    the start): (position // C - before) * C, as the position less its remainder, which ONNX runs in integers
    (its lowering of the floor division goes through a float Div, a Floor and two Casts)."""
    chunk_length = attention.chunk_length
    return position - torch.remainder(position, chunk_length) - attention.chunks_before * chunk_length


def lsh_window(attention: LSHSelfAttention) -> int:
    """W: the positions of bucket order a new token attends to in each round."""
    return attention.chunk_length * (1 + attention.chunks_before + attention.chunks_after)


def lsh_key_slots(attention: LSHSelfAttention) -> int:
    """S: the window of W positions, or all L <= C + 1 positions before the reference first hashes."""
    return max(lsh_window(attention), attention.chunk_length + 1)


def lsh_attention_step(
    attention: LSHSelfAttention,
    hidden_states: torch.Tensor,
    past_states: torch.Tensor,
    past_buckets: torch.Tensor,
    lsh_unchunked: torch.Tensor,
    left_padding: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden_states B, 1, hidden (layer-normed); past_states B, Lp, hidden; past_buckets B, H, N, Lp;
    lsh_unchunked B (bool): attend to every position once instead of to each round's window; left_padding B.
    Returns the attention output B, 1, H*D and the new token's buckets B, H, N, 1."""
    heads = attention.num_heads
    window = lsh_window(attention)
    slots = torch.arange(lsh_key_slots(attention), device=hidden_states.device)  # S
    all_states = torch.cat([past_states, hidden_states], dim=1)  # B, L, hidden
    new_position = length_as_tensor(past_states, 1)  # its index in all_states
    padding = left_padding.view(-1, 1, 1, 1)  # B, 1, 1, 1: one Reshape in ONNX ([:, None, None, None] unsqueezed twice)
    row_length = new_position + 1 - padding  # B, 1, 1, 1: the row's own positions

    # The new token is projected by the same per-head weight as the keys, so that the weight has one reader
    # in an exported graph: the exporter then stores its per-head form as a constant, which int8 quantization
    # needs (it quantizes products by a constant only).
    query_key_weight = per_head_weight(attention.query_key, heads)  # H, hidden, D
    query = torch.matmul(hidden_states.unsqueeze(1), query_key_weight)  # B, H, 1, D
    # hash_vectors without its padding mask (the new token is never padding) and without its transposed copy
    # of the buckets: with one position, B, 1, H, N, R/2 is already B, H, N, 1, R/2.
    rotated = attention.rotate(merge_token_heads(query)).view(query.shape[0], heads, attention.num_hashes, 1, -1)
    new_buckets = attention.rotated_buckets(rotated)  # B, H, N, 1
    sorted_positions = ops.sort_by_bucket(torch.cat([past_buckets, new_buckets], dim=-1))  # B, H, N, L
    new_rank = torch.argmax((sorted_positions == new_position).to(torch.int32), dim=-1)  # B, H, N
    window_start = chunks_ahead_start(attention, new_rank)
    # The row's positions come first in bucket order, so its order wraps at its own length.
    window_ranks = torch.remainder(window_start.unsqueeze(-1) + slots, row_length)  # B, H, N, S
    window_positions = torch.gather(sorted_positions, -1, window_ranks)  # B, H, N, S

    full = lsh_unchunked.view(-1, 1, 1, 1)  # B, 1, 1, 1
    every_position = padding + torch.minimum(slots, row_length - 1)  # B, 1, 1, S
    key_positions = torch.where(full, every_position, window_positions)  # B, H, N, S
    valid = slots < torch.where(full, row_length, window)  # B, 1, 1, S

    rounds = attention.num_hashes
    key_states = gather_rows(all_states, key_positions.flatten(2))  # B, H, N*S, hidden
    key = length_normalize(project_per_head(key_states, query_key_weight, rounds), 1 / math.sqrt(attention.head_size))
    value = project_per_head(key_states, per_head_weight(attention.value, heads), rounds)  # B, H, N, S, D

    allowed = valid.unsqueeze(-2)  # B, 1, 1, 1, S
    not_self = ~((key_positions == new_position) & valid).unsqueeze(-2)  # B, H, N, 1, S
    out, log_normalizer = masked_softmax_attend(
        query.unsqueeze(2), key, value, allowed, not_self, attention.dropout, attention.training,
        with_log_normalizer=attention.num_hashes > 1,
    )  # B, H, N, 1, D and B, H, N, 1
    # One position: dropping its axis leaves each head's rounds, without a transposed copy.
    if log_normalizer is not None:
        log_normalizer = log_normalizer.squeeze(3)  # B, H, N
    out = combine_rounds(out.squeeze(3), log_normalizer, full.squeeze(3))  # B, H, D
    return merge_token_heads(out), new_buckets


def local_attention_step(
    attention: LocalSelfAttention, hidden_states: torch.Tensor, past_states: torch.Tensor, left_padding: torch.Tensor
) -> torch.Tensor:
    """hidden_states B, 1, hidden (layer-normed); past_states B, Lp, hidden; left_padding B -> attention output
    B, 1, H*D."""
    heads, head_size, chunk_length = attention.num_heads, attention.head_size, attention.chunk_length
    slots = torch.arange((1 + attention.chunks_before) * chunk_length, device=hidden_states.device)  # S
    all_states = torch.cat([past_states, hidden_states], dim=1)  # B, L, hidden
    new_position = (length_as_tensor(past_states, 1) - left_padding)[:, None]  # B, 1: in the row's own positions
    start = chunks_ahead_start(attention, new_position)
    # The reference slices `past[:, start:]`: a negative start counts from the end.
    start = torch.where(start >= 0, start, torch.clamp(new_position + start, min=0))
    positions = start + slots  # B, S
    valid = positions <= new_position  # B, S
    index = left_padding[:, None] + torch.minimum(positions, new_position)  # B, S
    key_states = gather_rows(all_states, index[:, None])  # B, 1, S, hidden

    # Each head's rows of the projections give B, H, ., D directly: no split of the heads (a transposed copy).
    query = torch.matmul(hidden_states.unsqueeze(1), per_head_weight(attention.query, heads))  # B, H, 1, D
    key = torch.matmul(key_states, per_head_weight(attention.key, heads)) / math.sqrt(head_size)  # B, H, S, D
    value = torch.matmul(key_states, per_head_weight(attention.value, heads))  # B, H, S, D
    out, _ = masked_softmax_attend(query, key, value, valid[:, None, None, :], None, attention.dropout,
                                   attention.training)  # B, H, 1, D
    return merge_token_heads(out)

"""LSH self-attention (Reformer section 2): hash, sort by bucket, attend in chunks, unsort, combine rounds."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import ops
from ..config import ReformerConfig
from .chunking import (
    ChunkedSelfAttention, length_as_tensor, length_normalize, look_adjacent, mask_bias, mask_scores,
    masked_softmax_attend, split_chunks, transposed_copy,
)
from .flex import flex_applies, flex_chunk_attend


def draw_rotations(config: ReformerConfig) -> torch.Tensor:
    """H, D, N, R/2 random rotations, drawn on the CPU exactly as the reference draws them from `hash_seed`,
    without touching the global random state."""
    generator = torch.Generator().manual_seed(config.resolved_hash_seed)
    shape = (config.num_attention_heads, config.attention_head_size, config.num_hashes, config.rotation_size // 2)
    return torch.randn(shape, generator=generator)


@dataclass
class SortedChunks:
    """One LSH call's queries, keys, values, positions and masks in bucket order, every round's K chunks one
    after another (N*K per head), each chunk with its window of W keys."""

    sorted_positions: torch.Tensor  # B, H, N, L: the positions in bucket order
    query: torch.Tensor  # B, H, N*K, C, D
    key: torch.Tensor  # B, H, N*K, W, D (length-normalised queries, scaled by 1/sqrt(D))
    value: torch.Tensor  # B, H, N*K, W, D
    query_positions: torch.Tensor  # B, H, N*K, C
    key_positions: torch.Tensor  # B, H, N*K, W
    key_allowed: torch.Tensor  # B, H, N*K, W (bool): the key is not padding
    window_slots: torch.Tensor  # W: 0 .. W-1
    in_window: torch.Tensor  # W (bool): the slot is attended to (only the query's own chunk when unchunked)


class LSHSelfAttention(ChunkedSelfAttention):
    def __init__(self, config: ReformerConfig):
        super().__init__(config, "lsh")
        self.num_hashes = config.num_hashes
        self.bucket_factors = config.num_buckets if isinstance(config.num_buckets, list) else [config.num_buckets]
        self.padding_bucket = config.bucket_count
        self.query_key = self.head_projection(config)
        self.value = self.head_projection(config)
        # Not in the state dict: the rotations follow from the config, as in the reference.
        self.register_buffer("rotations", draw_rotations(config), persistent=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        lsh_unchunked: torch.Tensor,
        forced_buckets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden_states B, L, hidden with L a multiple of C; attention_mask B, L (bool). lsh_unchunked (bool,
        0-d): the unpadded input is at most `lsh_unchunked_length` long, so all of it sits in the first chunk
        of every round. `forced_buckets` B, H, N, L are used instead of this call's own hashing: the
        reversible backward recomputes with the forward's buckets, and verification replays eager's buckets
        in an exported graph. Returns the attention output B, L, H*D and the buckets this call's hashing
        chose, B, H, N, L (whichever buckets were used)."""
        batch, length, _ = hidden_states.shape
        query_key = self.query_key(hidden_states)  # B, L, H*D
        value = self.value(hidden_states)  # B, L, H*D
        buckets = self.hash_vectors(query_key.detach(), attention_mask)
        used_buckets = buckets if forced_buckets is None else forced_buckets
        sorted_positions = ops.sort_by_bucket(used_buckets)  # B, H, N, L
        chunks = self.sorted_chunks(query_key, value, sorted_positions, attention_mask, lsh_unchunked)
        # The chunks hold both in bucket order: eager frees the projections before attending (2 of the tensors
        # live at the attention's peak, 128 MiB for `small` at 65,536 tokens).
        del query_key, value
        out, log_normalizer = self.attend_sorted(chunks)
        undo_positions = ops.invert_permutation(sorted_positions)  # B, H, N, L
        out = unsort_by_position(out, undo_positions)  # B, L, H, N, D
        if log_normalizer is not None:
            log_normalizer = torch.gather(log_normalizer, -1, undo_positions).permute(0, 3, 1, 2)  # B, L, H, N
        out = combine_rounds(out, log_normalizer, lsh_unchunked)  # B, L, H, D
        return out.reshape(batch, length, -1), buckets

    def hash_vectors(self, vectors: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """B, L, H*D as projected -> buckets B, H, N, L. Padding gets its own bucket, after all others.
        Every head's vectors go through that head's rotations in one matrix product against the block-diagonal
        of the rotations: no transposed copy of the vectors, and a plain MatMul in ONNX, where the per-head
        einsum was an Einsum that ONNX Runtime CPU runs on one thread (5.7 of 193 profiled ms for `small` at
        4,096 tokens and 2 threads). The zero blocks add exact zeros; the extra multiplications are H times a
        product of width N*R/2, small beside the projections.
        Half-precision vectors are hashed in fp32: rounding the rotated projections to fp16 before the argmax
        made ~40% more bucket flips against ONNX Runtime (which projects in fp32) on the `small` benchmark
        model at 4,096 tokens (367 against 226 over 10 inputs), and moved eager further from the exact hash."""
        batch, length, _ = vectors.shape
        buckets = self.rotated_buckets(self.rotate(vectors))  # B, L, H, N
        buckets = transposed_copy(buckets.flatten(2)).view(batch, self.num_heads, self.num_hashes, length)  # B, H, N, L
        return buckets.masked_fill(~attention_mask[:, None, None, :], self.padding_bucket)

    def rotate(self, vectors: torch.Tensor) -> torch.Tensor:
        """The first step of hash_vectors: B, L, H*D as projected -> rotated projections B, L, H, N, R/2."""
        batch, length, _ = vectors.shape
        rotations = self.rotations.float().flatten(2)  # H, D, N*R/2
        rotated = torch.matmul(vectors.float(), torch.block_diag(*rotations.unbind(0)))  # B, L, H*N*R/2
        return rotated.view(batch, length, self.num_heads, self.num_hashes, -1)

    def rotated_buckets(self, rotated: torch.Tensor) -> torch.Tensor:
        """The second step of hash_vectors: rotated projections ..., R/2 -> buckets ... (no padding bucket)."""
        buckets = None
        for start, half, stride in bucket_factor_slices(self.bucket_factors):
            part = rotated[..., start : start + half]
            # argmax over [part, -part] without writing that concatenation: the first maximum lies in `part`
            # when its maximum is at least -min(part), and is then part's first maximum; else it is -part's
            # first maximum, part's first minimum.
            positive_wins = torch.amax(part, dim=-1) >= -torch.amin(part, dim=-1)
            factor_buckets = torch.where(positive_wins, torch.argmax(part, dim=-1), torch.argmin(part, dim=-1) + half)
            buckets = factor_buckets if buckets is None else buckets + stride * factor_buckets
        return buckets

    def attend_sorted(self, chunks: SortedChunks) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Chunked attention in bucket order. Returns out B, H, N, L, D and, with more than one hashing round,
        log-normalisers B, H, N, L (None with one: its round weight is exactly 1)."""
        batch, heads, rounds, length = chunks.sorted_positions.shape
        if flex_applies(self.attn_implementation, self.training):
            out, log_normalizer = self.attend_flex(chunks)
        elif self.num_hashes > 1:
            out, log_normalizer = self.attend_rounds(chunks)
        else:
            out, log_normalizer = self.attend_one_round(chunks), None
        out = out.view(batch, heads, rounds, length, self.head_size)
        if log_normalizer is None:
            return out, None
        return out, log_normalizer.view(batch, heads, rounds, length)

    def sorted_chunks(
        self,
        query_key: torch.Tensor,
        value: torch.Tensor,
        sorted_positions: torch.Tensor,
        attention_mask: torch.Tensor,
        lsh_unchunked: torch.Tensor,
    ) -> SortedChunks:
        """What every attention path needs, in bucket order, from query_key and value B, L, H*D as projected,
        sorted_positions B, H, N, L, attention_mask B, L (bool) and lsh_unchunked (0-d bool, see forward)."""
        batch, heads, _, length = sorted_positions.shape
        sorted_query = split_chunks(gather_by_position(query_key, sorted_positions).flatten(2, 3), self.chunk_length)
        sorted_value = split_chunks(gather_by_position(value, sorted_positions).flatten(2, 3), self.chunk_length)
        # Keys are the length-normalised queries (shared query-key attention), scaled by 1/sqrt(D).
        sorted_key = length_normalize(sorted_query, 1 / math.sqrt(self.head_size))  # B, H, N*K, C, D
        sorted_key = look_adjacent(sorted_key, self.chunks_before, self.chunks_after)  # B, H, N*K, W, D
        sorted_value = look_adjacent(sorted_value, self.chunks_before, self.chunks_after)  # B, H, N*K, W, D

        query_positions = split_chunks(sorted_positions.flatten(2, 3), self.chunk_length)  # B, H, N*K, C
        key_positions = look_adjacent(query_positions, self.chunks_before, self.chunks_after)  # B, H, N*K, W
        # The mask in bucket order, then its neighbours: a gather of N*L values rather than N*L*W/C.
        sorted_allowed = torch.gather(attention_mask[:, None, :].expand(batch, heads, length), 2,
                                      sorted_positions.flatten(2, 3))  # B, H, N*L
        key_allowed = look_adjacent(split_chunks(sorted_allowed, self.chunk_length),
                                    self.chunks_before, self.chunks_after)  # B, H, N*K, W
        # An input that fits one chunk gets full attention, each key once, as in the reference: the
        # neighbouring chunks then hold only copies or padding, and copies of a self-masked key would
        # shift its -1e5 log-normaliser by log(copies), below fp32 resolution at that magnitude.
        window_slots = torch.arange(key_positions.shape[-1], device=key_positions.device)  # W
        own_start = self.chunks_before * self.chunk_length
        own_chunk = (window_slots >= own_start) & (window_slots < own_start + self.chunk_length)
        in_window = own_chunk | ~lsh_unchunked  # W
        return SortedChunks(sorted_positions, sorted_query, sorted_key, sorted_value, query_positions, key_positions,
                            key_allowed, window_slots, in_window)

    def attend_flex(self, chunks: SortedChunks) -> tuple[torch.Tensor, torch.Tensor | None]:
        """FlexAttention, masking score by score. Returns out B, H, N*K, C, D and, with several hashing rounds,
        log-normalisers B, H, N*K, C."""
        query_positions, key_positions, key_allowed, in_window = (
            chunks.query_positions, chunks.key_positions, chunks.key_allowed, chunks.in_window)

        def score_with_mask(score, b, h, k, c, w):
            query_position, key_position = query_positions[b, h, k, c], key_positions[b, h, k, w]
            allowed = self.allowed(key_allowed[b, h, k, w], in_window[w], query_position, key_position)
            return mask_scores(score, allowed, self.not_self(in_window[w], query_position, key_position),
                               chunks.query.dtype)

        return flex_chunk_attend(chunks.query, chunks.key, chunks.value, score_with_mask, scale=1.0,
                                 with_log_normalizer=self.num_hashes > 1)

    def attend_rounds(self, chunks: SortedChunks) -> tuple[torch.Tensor, torch.Tensor]:
        """Eager attention of several hashing rounds, with each query's log-normaliser (`combine_rounds` weights
        the rounds with it). Returns out B, H, N*K, C, D and log-normalisers B, H, N*K, C."""
        not_self = self.not_self(chunks.in_window, chunks.query_positions.unsqueeze(-1),
                                 chunks.key_positions.unsqueeze(-2))  # B, H, N*K, C, W
        dropout = self.dropout if self.training else 0.0
        return masked_softmax_attend(chunks.query, chunks.key, chunks.value, self.allowed_in_windows(chunks), not_self,
                                     dropout, dropout > 0, with_log_normalizer=True)

    def attend_one_round(self, chunks: SortedChunks) -> torch.Tensor:
        """Eager attention of a single hashing round: B, H, K, C, D.
        Without a log-sum-exp `ops.attend` applies, with the masks as one added bias. That is exact: every
        row keeps its own position (at the self-mask value), so a masked key's probability is 0 and a row
        that sees only itself gives it probability 1, as masking gives."""
        is_self = self.single_round_self(chunks.window_slots, chunks.in_window,
                                         length_as_tensor(chunks.query_positions, 2))  # C, W
        bias = mask_bias(self.allowed_in_windows(chunks), chunks.query.dtype, is_self)
        return ops.attend(chunks.query, chunks.key, chunks.value, bias, scale=1.0,
                          dropout=self.dropout if self.training else 0.0)

    def allowed_in_windows(self, chunks: SortedChunks) -> torch.Tensor:
        """`allowed` for every query of every chunk against its window: B, H, N*K, C, W."""
        return self.allowed(chunks.key_allowed.unsqueeze(-2), chunks.in_window, chunks.query_positions.unsqueeze(-1),
                            chunks.key_positions.unsqueeze(-2))

    def allowed(self, key_allowed: torch.Tensor, in_window: torch.Tensor, query_position: torch.Tensor,
                key_position: torch.Tensor) -> torch.Tensor:
        """Which keys each query may attend to: not padding, inside the window, and in a causal model not after
        the query. Broadcasts, from whole windows (eager) down to single scores (FlexAttention's score_mod)."""
        allowed = key_allowed & in_window
        if self.is_decoder:
            allowed = allowed & (query_position >= key_position)
        return allowed

    @staticmethod
    def not_self(in_window: torch.Tensor, query_position: torch.Tensor, key_position: torch.Tensor) -> torch.Tensor:
        """Which keys are not the query itself. Copies of the query outside the window must stay masked, not
        fall back to the self-mask value."""
        return (query_position != key_position) | ~in_window

    def single_round_self(self, window_slots: torch.Tensor, in_window: torch.Tensor, chunk_count: torch.Tensor
                          ) -> torch.Tensor:
        """`~not_self` for one hashing round, without comparing positions: C, W, the same for every chunk.
        Bucket order is then a permutation of the positions, so query c of chunk k meets its own position in
        window slot w exactly where slot w lies in a copy of chunk k (its chunk offset is a multiple of the
        chunk count K, which happens more than once when K is smaller than the window) at row c. Saves a
        full-size comparison and the select it fed."""
        rows = torch.arange(self.chunk_length, device=window_slots.device)  # C
        chunk_offset = torch.div(window_slots, self.chunk_length, rounding_mode="floor") - self.chunks_before  # W
        own_copy = torch.remainder(chunk_offset, chunk_count) == 0  # W
        same_row = torch.remainder(window_slots, self.chunk_length) == rows[:, None]  # C, W
        return same_row & own_copy & in_window


def bucket_factor_slices(factors: list[int]) -> list[tuple[int, int, int]]:
    """For each factor of a (factorised) bucket count: where its rotations start in the R/2 axis, how many it
    has (factor / 2), and its stride in the combined bucket id (the product of the factors before it).
    A factor's bucket is the argmax over its rotated projections and their negations, so bucket j < factor/2
    is rotation column start + j, and bucket j >= factor/2 is the negation of column start + j - factor/2."""
    slices, start, stride = [], 0, 1
    for factor in factors:
        slices.append((start, factor // 2, stride))
        start, stride = start + factor // 2, stride * factor
    return slices


def gather_by_position(vectors: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Pick each head's vectors by position for every hashing round: vectors B, L, H*D as projected;
    positions B, H, N, L -> B, H, N, L, D. One gather of rows by a flat index of B*H*N*L entries (row
    (b * L + position) * H + h of the B*L*H, D rows): an element-wise gather would need an index as large as its
    output, and a B, H, L, D layout a transposed copy first."""
    batch, heads, rounds, length = positions.shape
    rows = vectors.reshape(-1, vectors.shape[-1] // heads)  # B*L*H, D
    batch_start = torch.arange(batch, device=positions.device).view(batch, 1, 1, 1) * length_as_tensor(vectors, 1)
    head = torch.arange(heads, device=positions.device).view(1, heads, 1, 1)
    index = (batch_start + positions) * heads + head  # B, H, N, L
    return rows.index_select(0, index.flatten()).view(batch, heads, rounds, length, -1)


def unsort_by_position(sorted_out: torch.Tensor, undo_positions: torch.Tensor) -> torch.Tensor:
    """sorted_out B, H, N, L, D in bucket order; undo_positions B, H, N, L (where each position went) ->
    B, L, H, N, D in position order. One gather of rows by a flat index laid out B, L, H, N, so that the heads
    come out merged, with no transposed copy of the result (the index is built with H and N merged, for
    transposed_copy)."""
    batch, heads, rounds, length, head_size = sorted_out.shape
    rows = sorted_out.reshape(-1, head_size)  # B*H*N*L, D
    row_start = torch.arange(batch * heads * rounds, device=sorted_out.device).view(batch, heads * rounds, 1)
    index = transposed_copy(row_start * length_as_tensor(sorted_out, 3) + undo_positions.flatten(1, 2))  # B, L, H*N
    return rows.index_select(0, index.flatten()).view(batch, length, heads, rounds, head_size)


def combine_rounds(out: torch.Tensor, log_normalizer: torch.Tensor | None, lsh_unchunked: torch.Tensor) -> torch.Tensor:
    """Weight each round's output by its share of the total attention mass.
    out ..., N, D; log_normalizer ..., N -> ..., D. With one round the weight is exactly 1: the output is
    taken as it is, and the caller passes no log_normalizer (None).
    lsh_unchunked (bool, broadcast to ..., D): every round saw the same keys, where the reference attends
    once and combines nothing; round 0 is taken as it is there, as exact as the reference's (weights of 1/N
    round where N is not a power of two).
    The weights are a softmax over the rounds, which subtracts the largest log-normaliser before exp: a row
    that sees only itself in every round has the self-mask value as its log-normaliser, -1e5 in fp32, where
    fp32's spacing is 0.0078, so exp(l - logsumexp(l)) took a logsumexp rounded at that magnitude and weighed
    two such rounds 0.4989 each instead of 1/2. They are computed in fp32 for every dtype and rounded once, to
    the output's dtype."""
    if log_normalizer is None:
        return out.squeeze(-2)  # a view (a Reshape in ONNX), where indexing round 0 would copy
    weights = torch.softmax(log_normalizer.float(), dim=-1).to(out.dtype)
    return torch.where(lsh_unchunked, out[..., 0, :], torch.sum(out * weights.unsqueeze(-1), dim=-2))

"""Local self-attention: each chunk of C positions attends to itself and its neighbouring chunks."""

from __future__ import annotations

import math

import torch

from ..config import ReformerConfig
from .. import ops
from .chunking import ChunkedSelfAttention, look_adjacent, mask_bias, merge_heads, split_chunks
from .flex import flex_applies, flex_chunk_attend


class LocalSelfAttention(ChunkedSelfAttention):
    def __init__(self, config: ReformerConfig):
        super().__init__(config, "local")
        self.query = self.head_projection(config)
        self.key = self.head_projection(config)
        self.value = self.head_projection(config)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """hidden_states B, L, hidden with L a multiple of C; attention_mask B, L (bool) -> B, L, H*D."""
        query, key, value = (ops.project_heads_into_chunks(hidden_states, projection.weight, num_heads=self.num_heads,
                                                          chunk_length=self.chunk_length)
                             for projection in (self.query, self.key, self.value))  # B, H, K, C, D
        key = look_adjacent(key, self.chunks_before, self.chunks_after)  # B, H, K, W, D
        value = look_adjacent(value, self.chunks_before, self.chunks_after)  # B, H, K, W, D

        positions = torch.arange(hidden_states.shape[1], device=hidden_states.device)
        query_positions = split_chunks(positions[None, None], self.chunk_length)  # 1, 1, K, C
        key_positions = look_adjacent(query_positions, self.chunks_before, self.chunks_after)  # 1, 1, K, W
        key_allowed = look_adjacent(split_chunks(attention_mask[:, None], self.chunk_length),
                                    self.chunks_before, self.chunks_after)  # B, 1, K, W
        scale = 1 / math.sqrt(self.head_size)
        # Every query of a real position has an allowed key (itself), so an added mask is exact here.
        if flex_applies(self.attn_implementation, self.training):
            def score_with_mask(score, b, h, k, c, w):
                allowed = self.allowed(key_allowed[b, 0, k, w], query_positions[0, 0, k, c], key_positions[0, 0, k, w])
                return score + mask_bias(allowed, query.dtype)

            out, _ = flex_chunk_attend(query, key, value, score_with_mask, scale)  # B, H, K, C, D
        else:
            allowed = self.allowed(key_allowed.unsqueeze(-2), query_positions.unsqueeze(-1),
                                   key_positions.unsqueeze(-2))  # B, 1, K, 1 or C, W
            out = ops.attend(query, key, value, mask_bias(allowed, query.dtype), scale=scale,
                             dropout=self.dropout if self.training else 0.0)  # B, H, K, C, D
        return merge_heads(out.flatten(2, 3))  # B, L, H*D

    def allowed(self, key_allowed: torch.Tensor, query_position: torch.Tensor, key_position: torch.Tensor
                ) -> torch.Tensor:
        """Which keys each query may attend to: keys that are not padding and, in a causal model, not after the
        query. Broadcasts, from whole windows (eager) down to single scores (FlexAttention's score_mod)."""
        if self.is_decoder:
            return key_allowed & (query_position >= key_position)
        return key_allowed

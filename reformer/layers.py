"""One reversible Reformer layer: an attention block and a chunked feed-forward block."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from .attention.local import LocalSelfAttention
from .attention.lsh import LSHSelfAttention
from .config import ReformerConfig
from .runtime_flags import is_exporting

ACTIVATION_FUNCTIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


def apply_in_chunks(function, hidden_states: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """function over chunks of `chunk_size` positions (dim 1), to bound peak memory; same numbers.
    Exported graphs run unchunked: a chunk loop would freeze the traced sequence length."""
    if chunk_size == 0 or is_exporting():
        return function(hidden_states)
    return torch.cat([function(chunk) for chunk in hidden_states.split(chunk_size, dim=1)], dim=1)


class ReformerSelfOutput(nn.Module):
    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.dropout = config.hidden_dropout_prob
        self.dense = nn.Linear(config.num_attention_heads * config.attention_head_size, config.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.dense(hidden_states), p=self.dropout, training=self.training)


class ReformerAttention(nn.Module):
    """LayerNorm, LSH or local self-attention, output projection."""

    def __init__(self, config: ReformerConfig, layer_index: int):
        super().__init__()
        self.is_lsh = config.attn_layers[layer_index] == "lsh"
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attention = LSHSelfAttention(config) if self.is_lsh else LocalSelfAttention(config)
        self.output = ReformerSelfOutput(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        lsh_unchunked: torch.Tensor,
        forced_buckets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the block output B, L, hidden and, for LSH layers, the buckets B, H, N, L its hashing chose
        (`forced_buckets`, if given, are used instead; see LSHSelfAttention.forward)."""
        normed = self.layer_norm(hidden_states)
        buckets = None
        if self.is_lsh:
            attended, buckets = self.self_attention(normed, attention_mask, lsh_unchunked, forced_buckets)
        else:
            attended = self.self_attention(normed, attention_mask)
        return self.output(attended), buckets


class ReformerFeedForwardDense(nn.Module):
    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.dropout = config.hidden_dropout_prob
        self.activation = ACTIVATION_FUNCTIONS[config.hidden_act]
        self.dense = nn.Linear(config.hidden_size, config.feed_forward_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # Dropout before the activation, as in the reference.
        return self.activation(F.dropout(self.dense(hidden_states), p=self.dropout, training=self.training))


class ReformerFeedForwardOutput(nn.Module):
    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.dropout = config.hidden_dropout_prob
        self.dense = nn.Linear(config.feed_forward_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.dense(hidden_states), p=self.dropout, training=self.training)


class ChunkedFeedForward(nn.Module):
    """LayerNorm, dense, activation, dense; applied `chunk_size_feed_forward` positions at a time."""

    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.chunk_size = config.chunk_size_feed_forward
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dense = ReformerFeedForwardDense(config)
        self.output = ReformerFeedForwardOutput(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return apply_in_chunks(self.forward_chunk, hidden_states, self.chunk_size)

    def forward_chunk(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # Positions as the rows of one matrix: linear layers on 2-D inputs export as Gemm, which ONNX Runtime
        # fuses with the bias and a ReLU (a 3-D MatMul, bias Add and activation each write the result).
        rows = hidden_states.reshape(-1, hidden_states.shape[-1])
        return self.output(self.dense(self.layer_norm(rows))).view(hidden_states.shape)


class ReformerLayer(nn.Module):
    """Reversible residual layer (RevNet): Y1 = X1 + Attention(X2), Y2 = X2 + FeedForward(Y1)."""

    def __init__(self, config: ReformerConfig, layer_index: int):
        super().__init__()
        self.attention = ReformerAttention(config, layer_index)
        self.feed_forward = ChunkedFeedForward(config)

    def forward(
        self,
        x1: torch.Tensor,
        x2: torch.Tensor,
        attention_mask: torch.Tensor,
        lsh_unchunked: torch.Tensor,
        forced_buckets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        attended, buckets = self.attention(x2, attention_mask, lsh_unchunked, forced_buckets)
        return *self.add_residuals(x1, x2, attended), buckets

    def add_residuals(
        self,
        x1: torch.Tensor,
        x2: torch.Tensor,
        attended: torch.Tensor,
        before_feed_forward: Callable[[torch.Tensor], None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The one place the reversible residual is written: Y1 = X1 + attended (the attention block's output
        for X2), Y2 = X2 + FeedForward(Y1). before_feed_forward(Y1) runs first (the reversible backward records
        the random state there, to replay the feed-forward's dropout)."""
        y1 = x1 + attended
        if before_feed_forward is not None:
            before_feed_forward(y1)
        return y1, x2 + self.feed_forward(y1)

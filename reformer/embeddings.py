"""Word embeddings plus axial or plain position embeddings."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .config import ReformerConfig


class AxialPositionEmbeddings(nn.Module):
    """Position embeddings factorised over `axial_pos_shape`: the table for position p concatenates one
    vector per axis, so a (64, 64) shape covers 4,096 positions with 64 + 64 rows."""

    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.axial_pos_shape = tuple(config.axial_pos_shape)
        self.dropout = config.hidden_dropout_prob
        self.weights = nn.ParameterList()
        for axis, width in enumerate(config.axial_pos_embds_dim):
            shape = [1] * len(self.axial_pos_shape) + [width]
            shape[axis] = self.axial_pos_shape[axis]
            self.weights.append(nn.Parameter(torch.ones(shape)))

    def full_table(self) -> torch.Tensor:
        """[*axial_pos_shape, hidden]: the embedding of every position, before flattening."""
        return torch.cat([weight.expand(*self.axial_pos_shape, -1) for weight in self.weights], dim=-1)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout > 0:
            table = self.full_table()  # s0, s1, hidden
            num_positions = math.prod(self.axial_pos_shape)
            # As the reference: per batch row, dropout2d drops whole rows of the second axis.
            batch = position_ids.shape[0]
            per_row = table.expand(batch, *table.shape).transpose(1, 2)  # B, s1, s0, hidden
            per_row = F.dropout2d(per_row, p=self.dropout, training=True).transpose(1, 2)
            per_row = per_row.reshape(batch, num_positions, -1)
            index = position_ids.unsqueeze(-1).expand(-1, -1, per_row.shape[-1])
            return torch.gather(per_row, 1, index)
        return self.lookup(position_ids)

    def lookup(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Each position's vector from its coordinate on every axis, the same values as the full table's row:
        an exported graph then stores the per-axis tables, not the full table (which an exporter folds into a
        constant of max_position_embeddings x hidden floats: 0.5 MB of byte-lm's 4.9 MB graph)."""
        parts, stride = [], math.prod(self.axial_pos_shape)
        for axis, (size, weight) in enumerate(zip(self.axial_pos_shape, self.weights)):
            stride //= size
            # Not `//`, which ONNX lowers with a sign correction that positions (never negative) do not need; its
            # lowering of this one goes through a float Div, exact below 2**24 positions. None for stride 1.
            coordinate = position_ids if stride == 1 else torch.div(position_ids, stride, rounding_mode="floor")
            # The first axis is not wrapped: a position past the table fails the lookup, as a row index would.
            parts.append(weight.reshape(size, -1)[coordinate if axis == 0 else coordinate % size])
        return torch.cat(parts, dim=-1)


class PositionEmbeddings(nn.Module):
    """A plain learned table of `max_position_embeddings` rows."""

    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.dropout = config.hidden_dropout_prob
        self.embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.embedding(position_ids), p=self.dropout, training=self.training)


class ReformerEmbeddings(nn.Module):
    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.dropout = config.hidden_dropout_prob
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = (
            AxialPositionEmbeddings(config) if config.axial_pos_embds else PositionEmbeddings(config)
        )

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        embeddings = F.dropout(inputs_embeds, p=self.dropout, training=self.training)
        return embeddings + self.position_embeddings(position_ids)

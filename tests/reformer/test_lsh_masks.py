"""LSH attention's self-mask for one hashing round, derived from the window's layout, against the comparison of
positions it replaces in the single-round graphs."""

import pytest
import torch

from reformer import ReformerConfig
from reformer.attention.chunking import length_as_tensor, look_adjacent, split_chunks
from reformer.attention.lsh import LSHSelfAttention


@pytest.mark.parametrize("chunks_before, chunks_after", [(1, 0), (0, 1), (2, 1), (3, 2)])
@pytest.mark.parametrize("chunk_count", [1, 2, 3, 5])
@pytest.mark.parametrize("unchunked", [False, True])
def test_single_round_self_equals_position_comparison(chunks_before, chunks_after, chunk_count, unchunked):
    # Chunk counts below the window's (1 + before + after) chunks put several copies of a query's own chunk
    # into its window: each copy must be found.
    chunk_length = 4
    config = ReformerConfig(attn_layers=["lsh"], num_attention_heads=2, attention_head_size=8, hidden_size=16,
                            axial_pos_embds=False, num_hashes=1, num_buckets=4, lsh_attn_chunk_length=chunk_length,
                            lsh_num_chunks_before=chunks_before, lsh_num_chunks_after=chunks_after)
    attention = LSHSelfAttention(config)
    length = chunk_count * chunk_length
    generator = torch.Generator().manual_seed(chunk_count)
    sorted_positions = torch.stack([torch.randperm(length, generator=generator) for _ in range(6)]).view(3, 2, length)
    query_positions = split_chunks(sorted_positions, chunk_length)  # B, H, K, C
    key_positions = look_adjacent(query_positions, chunks_before, chunks_after)  # B, H, K, W
    window_slots = torch.arange(key_positions.shape[-1])
    own_start = chunks_before * chunk_length
    in_window = ((window_slots >= own_start) & (window_slots < own_start + chunk_length)) | (not unchunked)

    compared = ~attention.not_self(in_window, query_positions.unsqueeze(-1), key_positions.unsqueeze(-2))
    derived = attention.single_round_self(window_slots, in_window, length_as_tensor(query_positions, 2))
    assert derived.shape == (chunk_length, key_positions.shape[-1])
    assert torch.equal(compared, derived.expand_as(compared))
    # Every query meets itself at least once, and, in a window of all its chunk's copies, once per copy.
    copies = sum((offset % chunk_count == 0) for offset in range(-chunks_before, chunks_after + 1))
    assert torch.equal(compared.sum(-1), torch.full_like(compared.sum(-1), 1 if unchunked else copies))

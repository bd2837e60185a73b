"""Tiny causal configs for generation tests: positions for a prompt plus 64 new tokens, hash_seed and
num_buckets set. initializer_range 0.5 gives logits far enough apart that greedy decoding is not decided by
near-ties, and varied continuations (a small init repeats a few tokens)."""

from __future__ import annotations

import torch

from tiny_configs import BASE

NEW_TOKENS = 64

CAUSAL_BASE = {**BASE, "max_position_embeddings": 128, "axial_pos_shape": [8, 16], "is_decoder": True,
               "eos_token_id": None, "initializer_range": 0.5}

CAUSAL_CONFIGS = {
    "lsh": {**CAUSAL_BASE, "attn_layers": ["lsh", "lsh"], "num_hashes": 2, "num_buckets": 4},
    "local": {**CAUSAL_BASE, "attn_layers": ["local", "local"]},
    "mixed": {**CAUSAL_BASE, "attn_layers": ["local", "lsh"], "num_hashes": 2, "num_buckets": [2, 4],
              "lsh_attn_chunk_length": 8},
}


def random_model(values: dict, seed: int = 0):
    """Our ReformerModelWithLMHead with random weights (no reference needed)."""
    import reformer

    torch.manual_seed(seed)
    return reformer.ReformerModelWithLMHead(reformer.ReformerConfig(**values)).eval()


def prompt(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, BASE["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


# Prompt lengths for batches of different lengths: one token (LSH attends to everything), within one chunk,
# across chunk boundaries, a multiple of the chunk lengths.
MIXED_LENGTHS = (1, 5, 13, 16, 3)


def mixed_prompts(lengths=MIXED_LENGTHS) -> list[list[int]]:
    return [prompt(1, length, seed=length)[0].tolist() for length in lengths]


def left_padded_prefill(model, rows: list[list[int]]):
    """Eager prefill of prompts of different lengths as generation runs it: (logits at every row's last
    prompt token, B, V, and the cache of all rows, left-padded to the longest prompt)."""
    from reformer.generation import DecoderCache, EagerDecoding
    from reformer.sampling import Prompts, left_pad_caches, prefill_by_length

    decoding = EagerDecoding(model, torch.device("cpu"))
    prompts = Prompts.from_inputs(rows)
    with torch.no_grad():
        logits, group_caches = prefill_by_length(decoding, prompts)
    cache = left_pad_caches(decoding, prompts, group_caches)
    return torch.from_numpy(logits), DecoderCache.from_tensors(model.config, tuple(cache))

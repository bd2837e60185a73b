"""Chunk attention through FlexAttention (`torch.nn.attention.flex_attention`): the attention of
`attn_implementation="flex_attention"`.

The chunks are folded into FlexAttention's batch axis (it needs a static head count): each of the B*K items has
the C queries of one chunk and the W keys of its window, exactly the keys the eager path attends to (neighbouring
chunks included, and repeated, as in the reference, when there are fewer chunks than 1 + before + after). So the
two paths agree up to float rounding everywhere, padded positions included, with no block mask to build. The
masks never take the size of the scores: `score_mod` computes each score's mask value from tensors of
B, H, K, C and B, H, K, W positions and padding flags, which a compiled kernel reads instead of a score-sized
mask. Eager FlexAttention runs PyTorch's unfused reference, which writes the scores: it is for checking, not for
speed (torch warns once when it runs).

torch.export (torch 2.13) does not take this path with a dynamic length yet: tracing score_mod fails on every
tensor it captures whose size derives from the padded length (K = (L + C - 1) // C chunks; "... is not tracked
with proxy"), in non-strict and in strict mode alike, whatever the layout (folding chunks into the head axis
instead makes the head count dynamic, which FlexAttention forbids); at a static shape torch.export takes it
but the AOTInductor compile fails ("Attempting to use FunctionalTensor on its own"). The exporters therefore
refuse models set to it (exporters.specs), and torch.compile on the CPU finds no kernel for it at the test
table's sizes."""

from __future__ import annotations

from typing import Callable

import torch
from torch.nn.attention.flex_attention import AuxRequest, flex_attention

# score_with_mask(score, b, h, k, c, w): the score of query c and key slot w of chunk k, head h, batch item b with its
# mask applied (index arguments are int tensors, as FlexAttention gives them).
ChunkScoreMask = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                          torch.Tensor]


def flex_applies(attn_implementation: str, training: bool) -> bool:
    """Whether chunk attention runs through FlexAttention: for inference and export. Training runs the eager
    math (the same numbers): FlexAttention has no dropout on attention probabilities, and no backward on
    the CPU."""
    return attn_implementation == "flex_attention" and not training


def flex_chunk_attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    score_with_mask: ChunkScoreMask,
    scale: float,
    with_log_normalizer: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(score_with_mask(scale * q k^T)) v within chunks: query B, H, K, C, D; key and value B, H, K, W, D.
    Returns out B, H, K, C, D and, when asked, the log-sum-exp of the masked scores B, H, K, C (natural log,
    fp32), which LSH combines hashing rounds with."""
    batch, heads, chunks, _, head_size = query.shape
    # Batch item and chunk of each folded item as tensors: score_mod may capture tensors, not symbolic sizes.
    folded_items = torch.arange(batch * chunks, device=query.device)
    item_of, chunk_of = folded_items // chunks, folded_items % chunks

    def score_mod(score, folded_item, h, c, w):
        return score_with_mask(score, item_of[folded_item], h, chunk_of[folded_item], c, w)

    # Chunks go into the batch axis, since FlexAttention needs a static head count. Contiguous copies, so that
    # every reshape is a view: reshaping strided tensors makes torch.export guard the number of chunks.
    folded = [tensor.transpose(1, 2).contiguous().view(batch * chunks, heads, tensor.shape[3], head_size)
              for tensor in (query, key, value)]  # B*K, H, C or W, D
    if not with_log_normalizer:
        out = flex_attention(*folded, score_mod=score_mod, scale=scale)
        return unfold(out, batch, chunks), None
    out, aux = flex_attention(*folded, score_mod=score_mod, scale=scale, return_aux=AuxRequest(lse=True))
    return unfold(out, batch, chunks), unfold(aux.lse, batch, chunks)


def unfold(folded: torch.Tensor, batch: int, chunks: int) -> torch.Tensor:
    """B*K, H, C, ... -> B, H, K, C, ... (contiguous)."""
    return folded.view(batch, chunks, *folded.shape[1:]).transpose(1, 2).contiguous()

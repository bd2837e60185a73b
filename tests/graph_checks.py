"""One comparison of a loaded exported graph with eager PyTorch, for the formats whose files load as torch
callables (TorchScript, AOTInductor packages)."""

from __future__ import annotations

import torch

from tiny_configs import make_inputs


def assert_graph_matches_eager(spec, model, graph, shapes, atol: float) -> None:
    """`graph(input_ids, attention_mask)` (exported with bucket outputs) against the model's export wrapper at
    each (batch, length) of `shapes`, padded masks included: every output with eager's shape and dtype, the
    buckets (B, H, N, L) equal where the mask keeps the position, the spec's outputs within `atol` (max abs;
    per-position outputs where the mask keeps the position)."""
    eager, config = spec.wrap(model, with_buckets=True), model.config
    for batch, length in shapes:
        input_ids, attention_mask = make_inputs(batch, length, config.vocab_size, seed=length)
        with torch.no_grad():
            expected, actual = eager(input_ids, attention_mask), graph(input_ids, attention_mask)
        assert len(actual) == len(spec.output_names) + config.attn_layers.count("lsh")
        keep = attention_mask.bool()
        for index, (want, got) in enumerate(zip(expected, actual)):
            label = f"output {index} at {batch}x{length}"
            assert got.shape == want.shape and got.dtype == want.dtype, label
            if index >= len(spec.output_names):  # buckets, B, H, N, L
                assert torch.equal(want.movedim(-1, 1)[keep], got.movedim(-1, 1)[keep]), label
                continue
            if spec.per_position(spec.output_names[index]):
                want, got = want[keep], got[keep]
            difference = (want - got).abs().max().item()
            assert difference <= atol, f"{label}: max abs diff {difference:.3g}"

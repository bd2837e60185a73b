"""One comparison of an exported graph, opened as the verifier opens it (its format's runner:
exporters.formats), with eager PyTorch, for every format."""

from __future__ import annotations

import torch

from exporters.formats import GRAPH_FORMATS
from rounding import assert_within, rounding_bound
from tiny_configs import make_inputs


def assert_graph_matches_eager(spec, model, fmt: str, path, shapes) -> None:
    """The `fmt` graph at path (exported with bucket outputs), run on the CPU, against the model's export wrapper at
    each (batch, length) of `shapes`, padded masks included: every output with eager's shape and dtype, the
    buckets (B, H, N, L) equal where the mask keeps the position, the spec's outputs within the first-order
    rounding bound of eager's computation (tests/rounding.py; per-position outputs where the mask keeps the
    position)."""
    eager, config = spec.wrap(model, with_buckets=True), model.config
    runner, why_not = GRAPH_FORMATS[fmt].open_runner(str(path), "cpu")
    assert runner is not None, why_not
    for batch, length in shapes:
        input_ids, attention_mask = make_inputs(batch, length, config.vocab_size, seed=length)
        with torch.no_grad():
            expected, actual = eager(input_ids, attention_mask), runner.run([input_ids, attention_mask])
        assert len(actual) == len(spec.output_names) + config.attn_layers.count("lsh")
        keep = attention_mask.bool()
        bounds = rounding_bound(eager, input_ids, attention_mask)
        for index, (want, got, bound) in enumerate(zip(expected, actual, bounds)):
            label = f"output {index} at {batch}x{length}"
            assert got.shape == want.shape and got.dtype == want.dtype, label
            if index >= len(spec.output_names):  # buckets, B, H, N, L
                assert torch.equal(want.movedim(-1, 1)[keep], got.movedim(-1, 1)[keep]), label
                continue
            assert_within(got, want, bound, label, keep if spec.per_position(spec.output_names[index]) else None)

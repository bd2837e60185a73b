"""Traced and exported graphs against eager PyTorch, at shapes other than the one they were built from.

Each model is traced (and, once per model class, exported with dynamic batch and sequence) at one shape,
then run at batch sizes and lengths that cover: length 1, shorter than a chunk, not a multiple of the chunk
length, and the maximum (32); with the masks of `make_inputs` (a hole and a padded tail) and with no
padding. Tolerance: the first-order rounding bound of eager's computation, element by element
(tests/rounding.py): graph and eager run the same ops, only kernel-level rounding separates them.
Per-position outputs are compared where the mask keeps the position (see tests/reformer/test_parity.py for
why masked positions are not defined); with an all-ones mask the graph is compared everywhere with eager
called without any mask."""

import pytest
import torch

import reformer
from exporters.program import export_program
from exporters.specs import MODEL_CLASS_TO_TASK, TASKS
from rounding import assert_within, rounding_bound
from tiny_configs import CASES, Case, make_inputs, per_position

# (batch, length): one token; shorter than every chunk; two lengths that are not a multiple of the chunk
# length (4 or 8); the maximum length, which is a multiple.
CHECK_SHAPES = [(1, 1), (3, 3), (1, 10), (2, 17), (3, 32)]
# The first case of each model class, for torch.export (each export takes seconds).
EXPORT_CASES = [
    next(case for case in CASES if case.model_class == model_class) for model_class in MODEL_CLASS_TO_TASK
]


def build_wrapper(case):
    torch.manual_seed(0)
    model = getattr(reformer, case.model_class)(reformer.ReformerConfig(**case.config_values)).eval()
    spec = TASKS[MODEL_CLASS_TO_TASK[case.model_class]]
    return spec, spec.wrap(model)


def assert_graph_matches_eager(graph, wrapper, spec, case):
    for batch, length in CHECK_SHAPES:
        input_ids, attention_mask = make_inputs(batch, length, seed=batch * 100 + length)
        all_kept = torch.ones_like(attention_mask)
        with torch.no_grad():
            eager_without_mask = wrapper.model(input_ids=input_ids)
            runs = {
                "masked": (graph(input_ids, attention_mask), wrapper(input_ids, attention_mask), attention_mask),
                "no mask": (graph(input_ids, all_kept),
                            [getattr(eager_without_mask, name) for name in spec.output_names], all_kept),
            }
        for label, (graph_outputs, eager_outputs, keep) in runs.items():
            bounds = rounding_bound(wrapper, input_ids, keep)
            for name, got, want, bound in zip(spec.output_names, graph_outputs, eager_outputs, bounds, strict=True):
                where = f"{case.name} {name} at batch {batch}, length {length} ({label})"
                kept = keep.bool() if per_position(case.model_class, name) else None
                assert_within(got, want, bound, where, kept)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_traced_graph_matches_eager_at_other_shapes(case):
    spec, wrapper = build_wrapper(case)
    example = make_inputs(2, case.length)
    with torch.no_grad():
        traced = torch.jit.trace(wrapper, example, check_trace=False)
    assert_graph_matches_eager(traced, wrapper, spec, case)


@pytest.mark.parametrize("case", EXPORT_CASES, ids=lambda case: case.model_class)
def test_exported_program_matches_eager_at_other_shapes(case):
    spec, wrapper = build_wrapper(case)
    program = export_program(wrapper, make_inputs(2, case.length), case.config_values["max_position_embeddings"])
    assert_graph_matches_eager(program.module(), wrapper, spec, case)


@pytest.mark.parametrize("num_hashes", [1, 2])
def test_exported_program_with_lsh_chunk_length_1_matches_eager(num_hashes):
    """LSH chunk length 1 pads nothing, so the padded length may be 1: torch.export once guarded it against 1
    where it checked the layout of the bucket transposes (reformer.attention.chunking.transposed_copy), in
    unsorting (every round count) and hashing (several rounds), and refused the export. Found by
    tests/test_properties.py, on one head as here."""
    case = Case("lsh_chunk_length_1", "ReformerModel", dict(attn_layers=["lsh", "lsh"], num_hashes=num_hashes,
                                                            num_attention_heads=1, lsh_attn_chunk_length=1), 5)
    spec, wrapper = build_wrapper(case)
    program = export_program(wrapper, make_inputs(2, case.length), case.config_values["max_position_embeddings"])
    assert_graph_matches_eager(program.module(), wrapper, spec, case)

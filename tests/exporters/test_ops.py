"""Every registered op under every lowering, exported alone to ONNX and run in ONNX Runtime (CPU) against
its eager implementation, on shapes other than the export's: length 1, odd lengths, ties in buckets.

Tolerances: the index ops must match exactly (they are permutations). The float ops (attend,
attend_with_log_normalizer, project_heads_into_chunks) within the first-order rounding bound of their eager
computation, element by element (tests/rounding.py): sums and products bounded by n eps sum|terms|, not by
the result, whose magnitude says nothing when terms cancel (a projection's sum of 12 products of size ~1 can
be 1e-2). The lowerings sum the same products in other orders, with other kernels per processor, and the
fused attention kernel scales the product instead of the keys."""

from __future__ import annotations

import threading

import onnx_ir as ir
import onnxruntime
import pytest
import torch
from torch import nn

import reformer.ops
from exporters import ops
from exporters.onnx import to_onnx_model
from reformer.attention.chunking import MASK_VALUE, SELF_MASK_VALUE
from rounding import assert_within, rounding_bound

EXPORT_SHAPE = (2, 2, 3, 5)  # B, H, N, L; B and L dynamic
RUN_SHAPES = [(1, 2, 3, 1), (2, 2, 3, 7), (3, 2, 3, 16)]
# A small context allows float sort keys; a huge bucket count forces the ort lowering back to int64 keys.
CONTEXTS = [ops.LoweringContext(bucket_count=4, max_length=64), ops.LoweringContext(bucket_count=2**20, max_length=64)]


def buckets_with_ties(shape, generator):
    buckets = torch.randint(0, 3, shape, generator=generator)
    buckets[0, 0] = 1  # one row of a single bucket: every key ties
    return buckets


def random_permutations(shape, generator):
    return torch.rand(shape, generator=generator).argsort(dim=-1)


def attention_inputs(shape, generator, dtype):
    """query, key, value and bias for B, H, K chunks (K = shape's length axis) of 4 queries by 8 keys of 6 dims;
    the bias masks about a third of the keys, all but one key of the first query row, and none of a row's
    first key (as the model's masks leave every real row its own position)."""
    batch, heads, _, chunks = shape
    query, key, value = (torch.randn(size, generator=generator).to(dtype) for size in
                         [(batch, heads, chunks, 4, 6), (batch, heads, chunks, 8, 6), (batch, heads, chunks, 8, 6)])
    masked = torch.rand(batch, 1, chunks, 4, 8, generator=generator) < 0.3
    masked[..., 0, 1:] = True
    masked[..., 0] = False
    bias = torch.zeros(masked.shape).masked_fill(masked, MASK_VALUE[dtype]).to(dtype)
    return query, key, value, bias


def masked_attention_inputs(shape, generator, dtype):
    """query, key, value, allowed and not_self for B, H, K chunks of 4 queries by 8 keys of 6 dims, as the
    several-round LSH attention has them: each query row c meets itself at key c, row 1 also at key 5 (a copy
    of key 1, as a window wider than the chunks holds), row 0 nothing else (its own key, at the self-mask
    value, takes all its probability), and about a third of the other keys are masked."""
    batch, heads, _, chunks = shape
    query, key, value = (torch.randn(size, generator=generator).to(dtype) for size in
                         [(batch, heads, chunks, 4, 6), (batch, heads, chunks, 8, 6), (batch, heads, chunks, 8, 6)])
    key[..., 5, :], value[..., 5, :] = key[..., 1, :], value[..., 1, :]
    allowed = torch.rand(batch, 1, chunks, 4, 8, generator=generator) >= 0.3
    allowed[..., 0, :] = False
    not_self = torch.ones(batch, heads, chunks, 4, 8, dtype=torch.bool)
    for row in range(4):
        not_self[..., row, row] = False
    not_self[..., 1, 5] = False
    return query, key, value, allowed, not_self


def mask_values(dtype):
    return {"mask_value": MASK_VALUE[dtype], "self_mask_value": SELF_MASK_VALUE[dtype], "dropout": 0.0}


PROJECTION_CHUNK = 4


def projection_inputs(shape, generator, dtype):
    """hidden states B, L, 12 with L = 4 * (shape's length), and a bias-free projection's weight for 3 heads
    of 2 dimensions (6, 12)."""
    batch, _, _, chunks = shape
    hidden_states = torch.randn(batch, chunks * PROJECTION_CHUNK, 12, generator=generator)
    return hidden_states.to(dtype), torch.randn(6, 12, generator=generator).to(dtype)


# op name -> (input maker, dtypes, keyword arguments (or a function of the dtype giving them)[, dynamic
# axes]); a maker returns a tensor or a tuple of them. Dynamic axes, per input: {axis: "batch", "length" or
# "chunks" (a length of whole chunks)}; by default each input has its batch on axis 0 and its length (or
# chunks) on axis 3 (one tensor) or 2 (several). A registered op missing here fails test_every_op_has_inputs.
INPUTS = {
    "sort_by_bucket": (buckets_with_ties, [torch.int64], {}),
    "invert_permutation": (random_permutations, [torch.int64], {}),
    "attend": (attention_inputs, [torch.float32, torch.float16], {"scale": 0.4, "dropout": 0.0}),
    "attend_with_log_normalizer": (masked_attention_inputs, [torch.float32, torch.float16], mask_values),
    "project_heads_into_chunks": (projection_inputs, [torch.float32, torch.float16],
                                  {"num_heads": 3, "chunk_length": PROJECTION_CHUNK},
                                  [{0: "batch", 1: "chunks"}, {}]),
}


def body_name(op, lowering, context) -> str:
    body = op.lowerings[lowering](context) if isinstance(op, ops.CustomOp) else op.lowerings[lowering]
    return getattr(body, "name", None) or body.__name__


def cases():
    """(op, lowering, context, dtype) for each distinct lowering body of every op."""
    seen = set()
    for op in ops.REGISTRY.values():
        for lowering in op.lowerings:
            for context in CONTEXTS:
                body = body_name(op, lowering, context)
                if (op.name, lowering, body) in seen:
                    continue
                seen.add((op.name, lowering, body))
                for dtype in INPUTS.get(op.name, (None, [None], {}))[1]:
                    yield pytest.param(op, lowering, context, dtype, id=f"{op.name}-{lowering}-{body}-{dtype}")


class OneOp(nn.Module):
    def __init__(self, op, dtype=None):
        super().__init__()
        self.op = op
        keywords = INPUTS[op.name][2]
        self.keywords = keywords(dtype) if callable(keywords) else keywords
        self.dynamic_axes = INPUTS[op.name][3] if len(INPUTS[op.name]) > 3 else None

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.op.eager(*inputs, **self.keywords)


def make_inputs(op, shape, dtype, seed=0) -> tuple[torch.Tensor, ...]:
    make = INPUTS[op.name][0]
    generator = torch.Generator().manual_seed(seed)
    made = make(shape, generator, dtype) if dtype.is_floating_point else make(shape, generator)
    return made if isinstance(made, tuple) else (made,)


def test_every_op_has_inputs():
    assert set(ops.REGISTRY) == set(INPUTS)


@pytest.mark.parametrize("op, lowering, context, dtype", list(cases()))
def test_lowering_matches_eager(op, lowering, context, dtype, tmp_path):
    check_lowering(op, lowering, context, dtype, tmp_path, opset=ops.MODE_MIN_OPSET.get(lowering, 18))


def test_kept_function_follows_the_model_opset(tmp_path):
    """A custom-domain node's function must import the model's opset version, here the highest supported."""
    check_lowering(ops.REGISTRY["sort_by_bucket"], "ort", CONTEXTS[0], torch.int64, tmp_path, opset=21)


def check_lowering(op, lowering, context, dtype, tmp_path, opset):
    module = OneOp(op, dtype)
    example = make_inputs(op, EXPORT_SHAPE, dtype)
    output_names = [f"y{index}" for index in range(len(module(*example)) if isinstance(op, ops.CustomOp)
                                                         and op.output_shapes else 1)]
    names = [f"x{index}" for index in range(len(example))]
    batch, length = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("length", min=1, max=64)
    if module.dynamic_axes is None:
        length_axis = 3 if len(example) == 1 else 2
        dims = tuple({0: batch, length_axis: length} for _ in example)
    else:
        named = {"batch": batch, "length": length, "chunks": PROJECTION_CHUNK * length}
        dims = tuple({axis: named[name] for axis, name in axes.items()} for axes in module.dynamic_axes)
    model, chosen = to_onnx_model(
        lambda: torch.export.export(module, example, dynamic_shapes=(dims,)),  # one entry: forward(*inputs)
        lowering, context, opset=opset, output_names=output_names, input_names=names,
    )
    assert chosen[op.name] == lowering
    if isinstance(op, ops.CustomOp):  # the placeholders are gone again: eager and TorchScript see the op itself
        assert op.eager.__module__ == "reformer.ops"
    custom_nodes = [node for node in model.graph if node.domain == ops.DOMAIN]
    keeps_custom_node = isinstance(op, ops.CustomOp) and lowering in ops.KEPT_LOWERINGS
    assert len(custom_nodes) == (1 if keeps_custom_node else 0)
    assert len(model.functions) == (1 if keeps_custom_node else 0)
    ir.save(model, tmp_path / "op.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "op.onnx"), providers=["CPUExecutionProvider"])
    for seed, shape in enumerate(RUN_SHAPES):
        inputs = make_inputs(op, shape, dtype, seed)
        got = [torch.from_numpy(x) for x in session.run(None, {name: x.numpy() for name, x in zip(names, inputs)})]
        want, bound = module(*inputs), rounding_bound(module, *inputs)
        if isinstance(want, torch.Tensor):
            want, bound = [want], [bound]
        for index, (got_one, want_one, bound_one) in enumerate(zip(got, want, bound, strict=True)):
            label = f"{op.name} output {index} at shape {shape}"
            if want_one.dtype.is_floating_point:
                assert_within(got_one, want_one, bound_one, label)
            else:
                assert torch.equal(got_one, want_one), f"{label} differs"


def test_placeholders_stay_on_their_input_device():
    """torch.onnx.ops.symbolic's fake result is made on the CPU: a CUDA export then failed at the first op
    mixing it with a CUDA tensor ("found two different devices cuda:0, cpu"). The meta device shows the same
    device propagation on a machine without a GPU: the whole model exports on it."""
    import reformer
    from exporters.program import export_program
    from exporters.specs import TASKS, example_inputs
    from tiny_configs import CASES_BY_NAME

    config = reformer.ReformerConfig(**CASES_BY_NAME["lm_lsh_factorised"].config_values)
    model = reformer.ReformerModelWithLMHead(config).eval().to("meta")
    with ops.onnx_placeholders():
        program = export_program(TASKS["causal-lm"].wrap(model, with_buckets=True),
                                 example_inputs(config, 32, "meta"), 32)
    targets = {str(node.target) for node in program.graph.nodes}
    assert any("onnx_symbolic" in target for target in targets)  # the placeholders are in the graph


@pytest.mark.parametrize("name", [name for name, (_, dtypes, *_) in INPUTS.items() if torch.float32 in dtypes])
def test_the_bound_rejects_an_input_off_by_one_part_in_ten_thousand(name):
    """The tolerance must still catch a wrong lowering: scaling the first input by 1 + 1e-4 (a lowering that
    read a slightly wrong scale or weight) moves the outputs past the rounding bound."""
    module = OneOp(ops.REGISTRY[name], torch.float32)
    inputs = make_inputs(module.op, RUN_SHAPES[-1], torch.float32)
    bound = rounding_bound(module, *inputs)
    off, want = module(inputs[0] * (1 + 1e-4), *inputs[1:]), module(*inputs)
    if isinstance(want, tuple):  # the first output (the attention output) must catch it
        off, want, bound = off[0], want[0], bound[0]
    with pytest.raises(AssertionError, match="rounding bound"):
        assert_within(off, want, bound)


def test_placeholders_act_only_in_the_exporting_thread():
    """While one thread exports, another running the model gets the eager ops: the placeholders are the
    exporting thread's choice (swapped module globals gave them to every thread). Called eagerly, the
    placeholder returns zeros of the op's shape."""
    buckets = torch.tensor([[2, 0, 1, 0]])
    entered, ran = threading.Event(), threading.Event()
    results = {}

    def exporting():
        with ops.onnx_placeholders():
            entered.set()
            ran.wait(timeout=60)
            results["exporting"] = reformer.ops.sort_by_bucket(buckets)

    def running():
        entered.wait(timeout=60)
        results["running"] = reformer.ops.sort_by_bucket(buckets)
        ran.set()

    threads = [threading.Thread(target=target) for target in (exporting, running)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert torch.equal(results["running"], torch.tensor([[1, 3, 2, 0]]))
    assert torch.equal(results["exporting"], torch.zeros_like(buckets))
    assert torch.equal(reformer.ops.sort_by_bucket(buckets), results["running"])  # and this thread, after

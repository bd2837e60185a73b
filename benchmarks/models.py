"""The models the benchmarks run: `tiny` (models/tiny) and the `small` and `large` shapes at which
transformers' Reformer was first timed on an H100, with random weights from a fixed seed, as a causal LM over
a byte vocabulary of 258; and the same model as transformers' Reformer, for the reference rows."""

from __future__ import annotations

import math
import tempfile

MODEL_NAMES = ("tiny", "small", "large")
SHAPES = {
    "small": dict(hidden_size=256, attn_layers=["local", "lsh"] * 3, num_attention_heads=2, attention_head_size=128,
                  feed_forward_size=512, local_attn_chunk_length=64, lsh_attn_chunk_length=64, num_hashes=1,
                  axial_pos_embds_dim=[64, 192]),
    "large": dict(hidden_size=1024, attn_layers=["local", "lsh"] * 6, num_attention_heads=8, attention_head_size=128,
                  feed_forward_size=4096, local_attn_chunk_length=128, lsh_attn_chunk_length=256, num_hashes=2,
                  axial_pos_embds_dim=[256, 768]),
}
COMMON_VALUES = dict(is_decoder=True, hash_seed=0, vocab_size=258, hidden_dropout_prob=0.0,
                     local_attention_probs_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0)


def axial_shape(length: int) -> list[int]:
    """Two factors whose product covers `length`, as square as powers of two allow (64 x 64 for 4,096)."""
    first = 2 ** math.ceil(math.log2(length) / 2)
    return [first, math.ceil(length / first)]


def build_model(name: str, max_length: int, num_hashes: int | None = None):
    """(model in eval mode on the CPU, fp32; its causal-lm spec). `small` and `large` get
    `max_position_embeddings` = max_length (so `num_buckets` follows the library's rule for that length) and
    square axial positions; `num_hashes`, where given, replaces their hashing rounds."""
    import torch

    from exporters.models import RANDOM_WEIGHTS_SEED, resolve_model
    from exporters.specs import TASKS
    from reformer import ReformerConfig, ReformerModelWithLMHead

    if name == "tiny":
        resolved = resolve_model("tiny", "causal-lm")
        return resolved.model, resolved.spec
    shape = SHAPES[name] if num_hashes is None else {**SHAPES[name], "num_hashes": num_hashes}
    config = ReformerConfig(**shape, **COMMON_VALUES, max_position_embeddings=max_length,
                            axial_pos_shape=axial_shape(max_length))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        model = ReformerModelWithLMHead(config).eval()
    return model, TASKS["causal-lm"]


def reference_model(model):
    """The same weights and config in transformers' ReformerModelWithLMHead (eval mode, model's device and
    dtype), through save_pretrained and from_pretrained as a user would load them. Raises ImportError without
    transformers."""
    import transformers

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        reference = transformers.ReformerModelWithLMHead.from_pretrained(folder)
    parameter = next(model.parameters())
    return reference.to(device=parameter.device, dtype=parameter.dtype).eval()

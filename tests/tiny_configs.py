"""The table of tiny configs that drives most tests: together they cover every model class, LSH-only,
local-only and mixed layers, causal and bidirectional, 1 to 4 hashing rounds, integer and factorised
num_buckets, chunks after > 0, axial and plain position embeddings, relu and gelu, and lengths that are a
multiple of the chunk length, not a multiple, and shorter than one chunk."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import reformer
from exporters.specs import TASKS

BASE = dict(
    hidden_size=16,
    attention_head_size=4,
    num_attention_heads=2,
    feed_forward_size=32,
    axial_pos_shape=[4, 8],
    axial_pos_embds_dim=[8, 8],
    max_position_embeddings=32,
    vocab_size=30,
    num_buckets=4,
    hash_seed=3,
    lsh_attn_chunk_length=4,
    local_attn_chunk_length=4,
    hidden_dropout_prob=0.0,
    local_attention_probs_dropout_prob=0.0,
    lsh_attention_probs_dropout_prob=0.0,
    pad_token_id=0,
)


@dataclass
class Case:
    name: str
    model_class: str
    overrides: dict = field(default_factory=dict)
    length: int = 13

    @property
    def config_values(self) -> dict:
        return {**BASE, **self.overrides}


CASES = [
    Case("lm_mixed", "ReformerModelWithLMHead", dict(attn_layers=["local", "lsh"], is_decoder=True), 13),
    Case("lm_lsh_factorised", "ReformerModelWithLMHead",
         dict(attn_layers=["lsh", "lsh"], is_decoder=True, num_hashes=2, num_buckets=[2, 4]), 16),
    Case("lm_local_short", "ReformerModelWithLMHead",
         dict(attn_layers=["local", "local"], is_decoder=True, hidden_act="gelu"), 3),
    Case("lm_unequal_chunks_short", "ReformerModelWithLMHead",
         dict(attn_layers=["lsh", "local"], is_decoder=True, num_hashes=2, lsh_attn_chunk_length=4,
              local_attn_chunk_length=8), 3),
    Case("lm_lsh_fits_one_chunk", "ReformerModelWithLMHead",
         dict(attn_layers=["lsh", "local"], is_decoder=True, num_hashes=2, lsh_attn_chunk_length=8,
              axial_pos_embds=False), 6),
    Case("mlm_lsh_after", "ReformerForMaskedLM",
         dict(attn_layers=["lsh", "lsh"], num_hashes=3, lsh_num_chunks_after=1), 24),
    Case("mlm_mixed_4_hashes", "ReformerForMaskedLM",
         dict(attn_layers=["lsh", "local"], num_hashes=4, num_buckets=[2, 4], local_num_chunks_after=1,
              axial_pos_embds=False, hidden_act="gelu"), 10),
    Case("mlm_chunked_ff_head", "ReformerForMaskedLM",
         dict(attn_layers=["local", "lsh"], num_buckets=8, hidden_act="gelu_new", chunk_size_feed_forward=8,
              chunk_size_lm_head=5), 15),
    Case("base_lsh_before_after", "ReformerModel",
         dict(attn_layers=["lsh"], num_hashes=2, lsh_num_chunks_before=2, lsh_num_chunks_after=1), 20),
    Case("base_local_wide", "ReformerModel",
         dict(attn_layers=["local", "local", "local"], local_num_chunks_before=2, local_num_chunks_after=1), 7),
    Case("base_plain_max_length", "ReformerModel",
         dict(attn_layers=["local", "lsh"], axial_pos_embds=False, num_buckets=None), 32),
    Case("seqcls_mixed", "ReformerForSequenceClassification",
         dict(attn_layers=["local", "lsh"], num_hashes=2, num_labels=3), 12),
    Case("seqcls_regression", "ReformerForSequenceClassification",
         dict(attn_layers=["lsh", "lsh"], num_labels=1), 9),
    Case("qa_mixed", "ReformerForQuestionAnswering",
         dict(attn_layers=["lsh", "local"], num_hashes=2, lsh_attn_chunk_length=8), 6),
]
CASES_BY_NAME = {case.name: case for case in CASES}


def make_inputs(batch: int, length: int, vocab_size: int = 30, seed: int = 0):
    """Token ids and a mask whose last row pads the tail and whose first row has a hole (never position 0,
    which the classifier reads)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab_size, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    if length > 2:
        attention_mask[0, length // 2] = 0
    if batch > 1:
        attention_mask[-1, max(1, length - length // 3):] = 0
    return input_ids, attention_mask


def output_names(model_class: str) -> list[str]:
    return {
        "ReformerModel": ["last_hidden_state"],
        "ReformerForQuestionAnswering": ["start_logits", "end_logits"],
    }.get(model_class, ["logits"])


def per_position(model_class: str, name: str) -> bool:
    """Whether an output has one value per position (compared where the mask keeps the position)."""
    return model_class != "ReformerForSequenceClassification"


CONFIGS_PER_TASK = 6


def task_configs(task: str) -> list[tuple[str, dict]]:
    """The first CONFIGS_PER_TASK tiny configs that fit the task: causal-lm needs a causal config (one that
    looks at no chunk after), masked-lm a bidirectional one; the other heads take either."""
    chosen = []
    for case in CASES:
        values = dict(case.config_values)
        if task == "causal-lm":
            if values.get("lsh_num_chunks_after", 0) or values.get("local_num_chunks_after", 0):
                continue
            values["is_decoder"] = True
        elif task == "masked-lm":
            values["is_decoder"] = False
        chosen.append((case.name, values))
    return chosen[:CONFIGS_PER_TASK]


def build(task: str, values: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    return reformer.MODEL_CLASSES[TASKS[task].model_class](reformer.ReformerConfig(**values)).eval()



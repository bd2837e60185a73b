"""ReformerConfig: config.json round trips, validation, and the reference's rule for an unset num_buckets."""

import dataclasses
import json

import pytest

from reformer import ConfigError, ReformerConfig
from tiny_configs import BASE


def test_transformers_config_json_round_trip_keeps_every_field(tmp_path):
    transformers = pytest.importorskip("transformers")
    reference = transformers.ReformerConfig(**BASE, attn_layers=["local", "lsh"], is_decoder=True, num_labels=3)
    reference.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    config = ReformerConfig.from_pretrained(tmp_path)
    assert config.is_decoder and config.num_labels == 3 and config.attn_layers == ["local", "lsh"]
    # Fields this project does not use (transformers_version, id2label, ...) come back unchanged.
    assert "transformers_version" in config.extra
    assert {key: config.to_dict()[key] for key in written} == written


def test_unknown_fields_survive_a_round_trip(tmp_path):
    values = {**ReformerConfig(**BASE).to_dict(), "my_tool_settings": {"nested": [1, 2]}, "note": "kept"}
    (tmp_path / "config.json").write_text(json.dumps(values))
    config = ReformerConfig.from_pretrained(tmp_path)
    assert config.extra["my_tool_settings"] == {"nested": [1, 2]} and config.extra["note"] == "kept"
    assert ReformerConfig.from_dict(json.loads(json.dumps(config.to_dict()))).to_dict() == values


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(attn_layers=["lsh", "global"]), "attn_layers has unknown types ['global']"),
        (dict(attn_layers=[]), "attn_layers is empty"),
        (dict(num_buckets=5), "num_buckets must be even"),
        (dict(num_buckets=[2, 3]), "num_buckets must be even"),
        (dict(axial_pos_embds_dim=[8, 4]), "axial_pos_embds_dim [8, 4] must sum to hidden_size 16"),
        (dict(attn_layers=["lsh"], is_decoder=True, lsh_num_chunks_after=1), "needs lsh_num_chunks_after = 0"),
        (dict(attn_layers=["local"], is_decoder=True, local_num_chunks_after=2), "needs local_num_chunks_after = 0"),
    ],
    ids=["unknown-layer", "no-layers", "odd-buckets", "odd-bucket-factor", "axial-dims", "causal-lsh-after",
         "causal-local-after"],
)
def test_invalid_configs_are_refused(overrides, message):
    with pytest.raises(ConfigError) as error:
        ReformerConfig(**{**BASE, **overrides})
    assert message in str(error.value)


def test_bidirectional_config_may_look_ahead():
    config = ReformerConfig(**{**BASE, "lsh_num_chunks_after": 1, "local_num_chunks_after": 1})
    assert config.lsh_num_chunks_after == config.local_num_chunks_after == 1


def test_invalid_config_json_is_a_config_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "num_buckets": 3}))
    with pytest.raises(ConfigError, match="num_buckets must be even"):
        ReformerConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        ReformerConfig.from_pretrained(tmp_path)


# (max_position_embeddings, lsh_attn_chunk_length): a factorised result, plain powers of two at the limit and
# below it, a length that is not a power of two, and a long model.
BUCKET_RULE_CASES = [(32, 4), (64, 8), (96, 32), (100, 8), (4096, 64), (65536, 64)]


@pytest.mark.parametrize("max_length, chunk_length", BUCKET_RULE_CASES)
def test_unset_num_buckets_follows_the_reference_rule(max_length, chunk_length):
    """The reference resolves num_buckets from the first length it hashes; we resolve it from the longest
    allowed length, before any forward. Both must give the reference's value for that length."""
    transformers = pytest.importorskip("transformers")
    values = dict(attn_layers=["lsh"], axial_pos_embds=False, hidden_size=16, attention_head_size=4,
                  num_attention_heads=2, max_position_embeddings=max_length, lsh_attn_chunk_length=chunk_length,
                  num_buckets=None)
    reference_config = transformers.ReformerConfig(**values)
    reference_attention = transformers.models.reformer.modeling_reformer.LSHSelfAttention(reference_config)
    reference_attention._set_num_buckets(max_length)
    assert ReformerConfig(**values).num_buckets == reference_attention.num_buckets


def test_a_resolved_num_buckets_is_marked_and_the_mark_stays_out_of_config_json(tmp_path):
    """The mark lets an export say the buckets were resolved here; it survives dataclasses.replace (as
    from_pretrained with attn_implementation does), and config.json keeps only the resolved value."""
    values = {**BASE, "attn_layers": ["local", "lsh"], "num_buckets": None}
    resolved = ReformerConfig(**values)
    assert resolved.num_buckets_defaulted and resolved.num_buckets == [4, 4]
    assert dataclasses.replace(resolved, attn_implementation="flex_attention").num_buckets_defaulted
    assert not ReformerConfig(**BASE).num_buckets_defaulted
    assert not ReformerConfig(**{**values, "attn_layers": ["local"]}).num_buckets_defaulted  # nothing to resolve
    written = resolved.to_dict()
    assert "num_buckets_defaulted" not in written and written["num_buckets"] == [4, 4]
    (tmp_path / "config.json").write_text(json.dumps({**written, "num_buckets_defaulted": True}))
    assert not ReformerConfig.from_pretrained(tmp_path).num_buckets_defaulted  # a stray key is no config field

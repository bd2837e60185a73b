"""tests/replay_checks.py on candidates made to differ from eager: the property test relies on it to fail for
a candidate that hashes elsewhere (even where its outputs follow its own buckets, which the replay then
reproduces) or computes other values, and to pass eager's own run."""

import pytest
import torch

from exporters.specs import TASKS
from replay_checks import ReplayedEager
from tiny_configs import CASES_BY_NAME, build, make_inputs


def test_passes_eager_and_fails_other_buckets_or_other_values():
    values = CASES_BY_NAME["lm_lsh_factorised"].config_values  # two LSH layers, factorised buckets
    model = build("causal-lm", values)
    input_ids, attention_mask = make_inputs(2, 16)
    with torch.no_grad():
        own = model(input_ids=input_ids, attention_mask=attention_mask)
        moved = (own.buckets[0].clone(), *own.buckets[1:])
        moved[0][0, 0, 0, 0] = (moved[0][0, 0, 0, 0] + 1) % model.config.bucket_count  # a kept position
        follows_moved = model(input_ids=input_ids, attention_mask=attention_mask, forced_buckets=moved)
    eager = ReplayedEager(model, TASKS["causal-lm"], input_ids, attention_mask)
    assert eager.assert_matches([own.logits], own.buckets, "eager") == 0
    with pytest.raises(AssertionError, match="buckets that are no near-tie"):
        eager.assert_matches([follows_moved.logits], moved, "moved bucket")
    with pytest.raises(AssertionError, match="rounding bound"):
        eager.assert_matches([own.logits + 1e-4], own.buckets, "shifted logits")

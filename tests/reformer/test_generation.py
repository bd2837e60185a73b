"""Incremental decoding against the `transformers` reference.

Greedy tokens must equal the reference's `generate` exactly; step logits are compared with max abs diff
<= 1e-5 (fp32 CPU: the step runs the reference's ops on gathered windows, so only rounding separates them).

Where the reference's own cached decoding is not what we match, and why:
- LSH with the cache attends, per round, to a window of bucket order around the new token, which is not the
  attention pattern of rerunning the whole sequence; the reference's cached and uncached greedy decoding
  therefore part ways (test_cache_changes_lsh_decoding_like_reference). Local attention agrees either way.
- The reference's batched cached LSH decoding gathers every row's keys from row 0 (its batch offset in
  `_get_relevant_hid_states_and_buckets` is always 0); we match it row by row instead.
- The reference adds round offsets to cached buckets, num_buckets + 1 apart when the prompt needed padding
  and num_buckets apart in later steps unless a cached bucket exceeds num_hashes * num_buckets - 1; when the
  two disagree it compares a new bucket with shifted cached ones. We store per-round buckets (always
  comparable), so prompts here need no padding at prefill (length 3 <= a chunk, or a multiple of 8).
"""

import pytest
import torch

from generation_configs import CAUSAL_CONFIGS, NEW_TOKENS, prompt, random_model
from reformer.generation import DecoderCache, IncrementalDecoder, generate

transformers = pytest.importorskip("transformers")
ATOL = 1e-5


def reference_and_ours(values: dict, directory):
    import reformer

    torch.manual_seed(0)
    reference = transformers.ReformerModelWithLMHead(transformers.ReformerConfig(**values)).eval()
    reference.save_pretrained(directory)
    return reference, reformer.ReformerModelWithLMHead.from_pretrained(directory).eval()


def reference_generate(reference, input_ids, use_cache=True):
    with torch.no_grad():
        return reference.generate(input_ids, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=use_cache,
                                  eos_token_id=None, pad_token_id=0)


def first_difference(a: torch.Tensor, b: torch.Tensor) -> int | None:
    differing = (a != b).any(dim=0).nonzero()
    return None if len(differing) == 0 else int(differing[0])


@pytest.mark.parametrize("length", [3, 16])
@pytest.mark.parametrize("name", list(CAUSAL_CONFIGS))
def test_cached_greedy_matches_reference(name, length, tmp_path):
    reference, ours = reference_and_ours(CAUSAL_CONFIGS[name], tmp_path)
    input_ids = prompt(1, length, seed=length)
    expected = reference_generate(reference, input_ids)
    actual = generate(ours, input_ids, NEW_TOKENS)
    assert actual.shape == (1, length + NEW_TOKENS)
    assert first_difference(actual, expected) is None


@pytest.mark.parametrize("name", list(CAUSAL_CONFIGS))
def test_step_logits_match_reference(name, tmp_path):
    """Teacher-forced along a greedy continuation: prefill and every step's logits, and the cache itself."""
    reference, ours = reference_and_ours(CAUSAL_CONFIGS[name], tmp_path)
    tokens = generate(ours, prompt(1, 16, seed=1), 40)
    decoder = IncrementalDecoder(ours)
    with torch.no_grad():
        expected = reference(input_ids=tokens[:, :16], use_cache=True)
        logits, cache = decoder.prefill(tokens[:, :16])
        differences = [(expected.logits - logits).abs().max()]
        past = expected.past_buckets_states
        for position in range(16, tokens.shape[1]):
            expected = reference(input_ids=tokens[:, position : position + 1], past_buckets_states=past, use_cache=True)
            past = expected.past_buckets_states
            logits, cache = decoder.step(tokens[:, position : position + 1], cache)
            differences.append((expected.logits - logits).abs().max())
    assert max(differences) <= ATOL, f"max abs diff {max(differences):.3g}"
    for ours_states, reference_states in zip(cache.states, past.states_cache):
        assert (ours_states - reference_states).abs().max() <= ATOL
    config = ours.config
    lsh_layers = [index for index, kind in enumerate(config.attn_layers) if kind == "lsh"]
    for ours_buckets, layer in zip(cache.buckets, lsh_layers):
        offsets = torch.arange(config.num_hashes).view(1, 1, -1, 1) * config.bucket_count
        assert torch.equal(ours_buckets + offsets, past.buckets_cache[layer])


def test_batch_matches_reference_row_by_row(tmp_path):
    reference, ours = reference_and_ours(CAUSAL_CONFIGS["mixed"], tmp_path)
    input_ids = prompt(2, 16, seed=2)
    expected = torch.cat([reference_generate(reference, input_ids[row : row + 1]) for row in range(2)])
    assert first_difference(generate(ours, input_ids, NEW_TOKENS), expected) is None


@pytest.mark.parametrize("name", list(CAUSAL_CONFIGS))
def test_cache_changes_lsh_decoding_like_reference(name, tmp_path):
    """Uncached decoding matches the reference's; cached and uncached part ways exactly where the reference's
    do (never for local attention)."""
    reference, ours = reference_and_ours(CAUSAL_CONFIGS[name], tmp_path)
    input_ids = prompt(1, 3, seed=3)
    reference_cached, reference_uncached = reference_generate(reference, input_ids), reference_generate(
        reference, input_ids, use_cache=False)
    ours_cached, ours_uncached = generate(ours, input_ids, NEW_TOKENS), generate(
        ours, input_ids, NEW_TOKENS, use_cache=False)
    assert first_difference(ours_uncached, reference_uncached) is None
    parting = first_difference(ours_cached, ours_uncached)
    assert parting == first_difference(reference_cached, reference_uncached)
    if "lsh" in ours.config.attn_layers:
        assert parting is not None, "expected the LSH window to change decoding (see module docstring)"
    else:
        assert parting is None


def test_reorder_selects_rows():
    model = random_model(CAUSAL_CONFIGS["mixed"])
    decoder = IncrementalDecoder(model)
    input_ids = prompt(3, 9, seed=4)
    beam_idx = torch.tensor([2, 2, 0])
    with torch.no_grad():
        _, cache = decoder.prefill(input_ids)
        reordered = cache.reorder(beam_idx)
        logits, _ = decoder.step(input_ids[beam_idx, -1:], reordered)
        _, expected_cache = decoder.prefill(input_ids[beam_idx])
        expected, _ = decoder.step(input_ids[beam_idx, -1:], expected_cache)
    assert torch.equal(logits, expected)
    assert isinstance(reordered, DecoderCache) and reordered.past_length == 9


def test_eos_stops_and_pads():
    model = random_model(CAUSAL_CONFIGS["local"])
    input_ids = prompt(2, 5, seed=5)
    free = generate(model, input_ids, 20)
    eos = int(free[0, 8])  # the fourth new token of row 0
    stopped = generate(model, input_ids, 20, eos_token_id=eos)
    for row in range(2):
        hits = (free[row, 5:] == eos).nonzero()
        end = 5 + int(hits[0]) + 1 if len(hits) else free.shape[1]
        assert torch.equal(stopped[row, :end], free[row, :end])
        assert (stopped[row, end:] == model.config.pad_token_id).all()
    assert stopped.shape[1] <= free.shape[1]


def test_sampling_is_seeded_and_respects_top_k():
    model = random_model(CAUSAL_CONFIGS["local"])  # local: cached logits equal the full forward's
    input_ids = prompt(2, 4, seed=6)
    first = generate(model, input_ids, 16, do_sample=True, top_k=3, seed=7)
    assert torch.equal(first, generate(model, input_ids, 16, do_sample=True, top_k=3, seed=7))
    assert not torch.equal(first, generate(model, input_ids, 16, do_sample=True, top_k=3, seed=8))
    # Every sampled token is among the 3 most likely ones after its prefix.
    with torch.no_grad():
        logits = model(input_ids=first).logits[:, 3:-1]
    ranks = (logits > logits.gather(-1, first[:, 4:, None])).sum(-1)
    assert (ranks < 3).all()
    greedy = generate(model, input_ids, 16)
    assert torch.equal(generate(model, input_ids, 16, do_sample=True, top_k=1, seed=9), greedy)
    assert torch.equal(generate(model, input_ids, 16, do_sample=True, top_p=1e-6, seed=9), greedy)


def test_too_long_generation_is_refused():
    model = random_model(CAUSAL_CONFIGS["local"])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, prompt(1, 100), 30)

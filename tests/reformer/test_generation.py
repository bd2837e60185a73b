"""Incremental decoding against the `transformers` reference.

Greedy tokens must equal the reference's `generate` exactly; step logits (and the cache) are compared within the
first-order rounding bound of our whole teacher-forced run, prefill included (tests/rounding.py: the step runs
the reference's ops on gathered windows, so only rounding separates them, and each run carries its own cache's
rounding into later steps).

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

import numpy as np
import pytest
import torch

from generation_configs import (CAUSAL_CONFIGS, MIXED_LENGTHS, NEW_TOKENS, left_padded_prefill, mixed_prompts, prompt,
                                random_model)
from reformer.generation import IncrementalDecoder, generate, stream
from reformer.sampling import Prompts, TokenChooser

from rounding import assert_within, rounding_bound


def reference_and_ours(values: dict, directory):
    """The reference with random weights and ours loaded from it (skips the test without transformers)."""
    import reformer

    transformers = pytest.importorskip("transformers")
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

    def teacher_forced():
        """Every step's logits, the last cache's states, then that cache."""
        logits, cache = decoder.prefill(tokens[:, :16])
        runs = [logits]
        for position in range(16, tokens.shape[1]):
            logits, cache = decoder.step(tokens[:, position : position + 1], cache)
            runs.append(logits)
        return runs + list(cache.states) + [cache]

    *bounds, _ = rounding_bound(teacher_forced)
    with torch.no_grad():
        *actual, cache = teacher_forced()
        expected = [reference(input_ids=tokens[:, :16], use_cache=True)]
        for position in range(16, tokens.shape[1]):
            expected.append(reference(input_ids=tokens[:, position : position + 1],
                                      past_buckets_states=expected[-1].past_buckets_states, use_cache=True))
    past = expected[-1].past_buckets_states
    wanted = [output.logits for output in expected] + list(past.states_cache)
    for index, (got, want, bound) in enumerate(zip(actual, wanted, bounds, strict=True)):
        assert_within(got, want, bound, f"output {index}")
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


def test_generation_leaves_the_model_in_its_mode():
    """Generation runs without dropout (here 0.5, which would change the tokens), and a model in training
    mode, one submodule of it in eval mode, is left so: after generate, and between the steps of a stream."""
    model = random_model({**CAUSAL_CONFIGS["mixed"], "hidden_dropout_prob": 0.5})
    input_ids = prompt(2, 5, seed=10)
    in_eval_mode = generate(model, input_ids, 8)
    model.train()
    model.lm_head.eval()
    modes = {name: module.training for name, module in model.named_modules()}
    assert torch.equal(generate(model, input_ids, 8), in_eval_mode)
    assert {name: module.training for name, module in model.named_modules()} == modes
    for step, tokens in enumerate(stream(model, input_ids, 8)):
        assert torch.equal(tokens, in_eval_mode[:, 5 + step])
        assert {name: module.training for name, module in model.named_modules()} == modes


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


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("name", list(CAUSAL_CONFIGS))
def test_prompts_of_different_lengths_generate_as_alone(name, use_cache):
    """A ragged batch, and the same prompts left-padded with an attention mask: every row's tokens are those of
    generating it alone."""
    model = random_model(CAUSAL_CONFIGS[name])
    rows = mixed_prompts()
    batch = generate(model, rows, NEW_TOKENS, use_cache=use_cache)
    width = max(MIXED_LENGTHS)
    assert batch.shape == (len(rows), width + NEW_TOKENS)
    for index, row in enumerate(rows):
        alone = generate(model, torch.tensor([row]), NEW_TOKENS, use_cache=use_cache)[0]
        assert torch.equal(batch[index, width - len(row):], alone), f"row {index} (prompt of {len(row)})"
        assert (batch[index, : width - len(row)] == model.config.pad_token_id).all()
    padded = torch.full((len(rows), width), 7)  # any filler: the mask says where the prompts are
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for index, row in enumerate(rows):
        padded[index, width - len(row):], mask[index, width - len(row):] = torch.tensor(row), 1
    masked = generate(model, padded, NEW_TOKENS, use_cache=use_cache, attention_mask=mask)
    assert torch.equal(masked[:, width:], batch[:, width:]) and torch.equal(masked[:, :width], padded)


@pytest.mark.parametrize("name", list(CAUSAL_CONFIGS))
def test_left_padded_steps_match_rows_alone(name):
    """Logits of the left-padded cache's prefill and steps, row by row, against each row decoded alone, within
    the rounding bound of the row's own run (the left-padded batch computes the same math: its padding keys are
    masked)."""
    model = random_model(CAUSAL_CONFIGS[name])
    rows = mixed_prompts()
    decoder = IncrementalDecoder(model)
    tokens = prompt(len(rows), 24, seed=9)  # teacher-forced continuations
    logits, cache = left_padded_prefill(model, rows)
    assert cache.left_padding.tolist() == [max(MIXED_LENGTHS) - len(row) for row in rows]
    batch_logits = [logits]
    with torch.no_grad():
        for position in range(tokens.shape[1]):
            step_logits, cache = decoder.step(tokens[:, position : position + 1], cache)
            batch_logits.append(step_logits[:, -1])
    for index, row in enumerate(rows):
        def decoded_alone():
            alone, alone_cache = decoder.prefill(torch.tensor([row]))
            runs = [alone[0, -1]]
            for position in range(tokens.shape[1]):
                alone, alone_cache = decoder.step(tokens[index : index + 1, position : position + 1], alone_cache)
                runs.append(alone[0, -1])
            return runs

        with torch.no_grad():
            expected = decoded_alone()
        for step, (want, bound) in enumerate(zip(expected, rounding_bound(decoded_alone), strict=True)):
            assert_within(batch_logits[step][index], want, bound, f"row {index}, step {step}")


def test_attention_mask_must_pad_on_the_left():
    model = random_model(CAUSAL_CONFIGS["local"])
    input_ids = prompt(2, 6)
    right_padded = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="pad on the left"):
        generate(model, input_ids, 4, attention_mask=right_padded)
    with pytest.raises(ValueError, match="pad on the left"):
        generate(model, input_ids, 4, attention_mask=torch.zeros(2, 6))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        generate(model, input_ids, 4, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="leave it out"):
        generate(model, [[1, 2], [3]], 4, attention_mask=[[1, 1], [0, 1]])


def test_token_chooser_follows_transformers_processors():
    """Repetition penalty, then temperature, top-k and top-p, against transformers' logits processors."""
    pytest.importorskip("transformers")
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    history = torch.randint(0, 40, (3, 12), generator=torch.Generator().manual_seed(1))
    choose = TokenChooser(do_sample=True, temperature=0.7, top_k=9, top_p=0.8, repetition_penalty=1.3)
    choose.start(Prompts.from_inputs(history.numpy()), vocab_size=40)
    penalized = choose.penalize(logits.numpy())
    expected = RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    assert (penalized == expected.numpy()).all() and not (penalized == logits.numpy()).all()
    probabilities = choose.filtered_probabilities(penalized / choose.temperature)
    probabilities /= probabilities.sum(axis=-1, keepdims=True)
    warped = expected
    for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(9), TopPLogitsWarper(0.8)):
        warped = warper(history, warped)
    expected_probabilities = torch.softmax(warped, dim=-1).numpy()
    # float64: exp within an ulp, a sum of 40 positive terms, a division, and ours sums and divides once more;
    # each side within (2 * 40 + 4) u of p relative, so the two within (2 * 40 + 4) eps of p.
    bound = (2 * 40 + 4) * np.finfo(np.float64).eps * expected_probabilities
    assert (abs(probabilities - expected_probabilities) <= bound).all()
    assert ((probabilities > 0).sum(axis=-1) < 9).any()  # top-p cut below top-k somewhere


@pytest.mark.parametrize("name", ["local", "lsh"])
def test_repetition_penalty_matches_reference(name, tmp_path):
    reference, ours = reference_and_ours(CAUSAL_CONFIGS[name], tmp_path)
    input_ids = prompt(1, 16, seed=4)
    with torch.no_grad():
        expected = reference.generate(input_ids, max_new_tokens=NEW_TOKENS, do_sample=False, repetition_penalty=1.5,
                                      eos_token_id=None, pad_token_id=0)
    actual = generate(ours, input_ids, NEW_TOKENS, repetition_penalty=1.5)
    assert first_difference(actual, expected) is None
    assert first_difference(actual, generate(ours, input_ids, NEW_TOKENS)) is not None


def test_sampling_temperature_changes_the_spread():
    """Low temperature samples the greedy tokens; high temperature samples others, each drawn from the seed."""
    model = random_model(CAUSAL_CONFIGS["local"])
    input_ids = prompt(2, 4, seed=6)
    greedy = generate(model, input_ids, 16)
    assert torch.equal(generate(model, input_ids, 16, do_sample=True, temperature=1e-3, seed=1), greedy)
    hot = generate(model, input_ids, 16, do_sample=True, temperature=5.0, seed=1)
    assert torch.equal(hot, generate(model, input_ids, 16, do_sample=True, temperature=5.0, seed=1))
    assert (hot != greedy).float().mean() > 0.3


def test_stream_yields_the_tokens_of_generate():
    model = random_model(CAUSAL_CONFIGS["mixed"])
    rows = mixed_prompts()
    generated = generate(model, rows, 20, eos_token_id=5)
    steps = list(stream(model, rows, 20, eos_token_id=5))
    assert all(step.shape == (len(rows),) and step.dtype == torch.int64 for step in steps)
    assert torch.equal(torch.stack(steps, dim=1), generated[:, max(MIXED_LENGTHS):])
    first_three = []
    for step in stream(model, rows, 20):
        first_three.append(step)
        if len(first_three) == 3:
            break  # the consumer stops generation
    assert torch.equal(torch.stack(first_three, dim=1), generate(model, rows, 3)[:, max(MIXED_LENGTHS):])


def test_generation_options_are_checked():
    model = random_model(CAUSAL_CONFIGS["local"])
    input_ids = prompt(1, 4)
    for options, message in [({"temprature": 0.5}, "unknown generation option 'temprature'"),
                             ({"do_sample": True, "temperature": 0.0}, "temperature must be positive"),
                             ({"repetition_penalty": -1.0}, "repetition_penalty must be positive")]:
        with pytest.raises(ValueError, match=message):
            stream(model, input_ids, 4, **options)  # checked at the call, before any step
    with pytest.raises(ValueError, match="outside the vocabulary"):
        stream(model, [[1, 2, model.config.vocab_size]], 4)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        stream(model, [[1] * 100, [2]], 30)

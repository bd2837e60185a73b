"""LSH attention's steps on their own, on tensors small enough to check by hand: hashing, sorting by bucket,
unsorting, and combining hashing rounds.

Every check is exact but one: combining rounds against a direct softmax, whose round weights are computed in
fp32 by design (see that test)."""

import pytest
import torch

from reformer import ReformerConfig, ops
from reformer.attention.chunking import SELF_MASK_VALUE
from reformer.attention.lsh import LSHSelfAttention, combine_rounds, gather_by_position, unsort_by_position


def lsh_attention(num_buckets, heads: int, head_size: int, rounds: int) -> LSHSelfAttention:
    config = ReformerConfig(attn_layers=["lsh"], num_attention_heads=heads, attention_head_size=head_size,
                            hidden_size=16, axial_pos_embds=False, num_hashes=rounds, num_buckets=num_buckets,
                            lsh_attn_chunk_length=4)
    return LSHSelfAttention(config)


# ----- hashing -----

IDENTITY, SWAP = torch.eye(2), torch.tensor([[0.0, 1.0], [1.0, 0.0]])
# Two heads of 2 dimensions: head 0 hashes round 0 as they are and round 1 negated, head 1 round 0 with its
# dimensions swapped and round 1 as they are. Four buckets: the first maximum of [x0, x1, -x0, -x1].
VECTORS = [(3, 1), (1, 3), (-3, 1), (1, -3), (2, 2), (-2, 2), (5, 5)]  # the last one is padding
EXPECTED_BUCKETS = [
    [[0, 1, 2, 3, 0, 1, 4], [2, 3, 0, 1, 2, 0, 4]],  # head 0: rounds 0 and 1
    [[1, 0, 3, 2, 0, 0, 4], [0, 1, 2, 3, 0, 1, 4]],  # head 1
]


def test_hashing_takes_the_first_maximum_of_the_rotations_and_their_negations():
    """Ties go to the first maximum, as an argmax over the concatenation [rotated, -rotated] gives: (2, 2) to
    bucket 0 (x0 = x1), (-2, 2) to bucket 1 (x1 = -x0, the positive half first). Padding takes bucket 4,
    after every real one; each head hashes with its own rotations."""
    attention = lsh_attention(4, heads=2, head_size=2, rounds=2)
    rotations = [[IDENTITY, -IDENTITY], [SWAP, IDENTITY]]  # per head, per round: D, R/2
    attention.rotations = torch.stack([torch.stack(head, dim=1) for head in rotations])  # H, D, N, R/2
    vectors = torch.tensor(VECTORS, dtype=torch.float32).repeat(1, 2).unsqueeze(0)  # B, L, H*D: both heads alike
    attention_mask = torch.tensor([[True] * 6 + [False]])
    assert torch.equal(attention.hash_vectors(vectors, attention_mask), torch.tensor([EXPECTED_BUCKETS]))


def test_factorised_buckets_combine_each_factors_argmax():
    """num_buckets [2, 4]: rotation 0 gives the factor-2 bucket b2 (0 where x0 >= 0), rotations 1 and 2 the
    factor-4 bucket b4; the bucket is b2 + 2 * b4."""
    attention = lsh_attention([2, 4], heads=1, head_size=3, rounds=1)
    attention.rotations = torch.eye(3).view(1, 3, 1, 3)  # H, D, N, R/2
    vectors = torch.tensor([[[1.0, 3.0, -1.0], [-1.0, 0.5, -2.0], [0.0, -1.0, 0.0]]])  # B, L, H*D
    # b2, b4: (0, 0); (1, 3: -x2 = 2 is the largest); (0: x0 = -x0, 2: -x1 = 1 is the largest).
    expected = torch.tensor([0, 1 + 2 * 3, 0 + 2 * 2]).view(1, 1, 1, 3)
    assert torch.equal(attention.hash_vectors(vectors, torch.ones(1, 3, dtype=torch.bool)), expected)


# ----- sorting and unsorting -----

def test_sort_by_bucket_is_stable():
    buckets = torch.tensor([[0, 1, 2, 3, 0, 1, 4], [2, 2, 0, 2, 0, 2, 2]])
    expected = torch.tensor([[0, 4, 1, 5, 2, 3, 6], [2, 4, 0, 1, 3, 5, 6]])  # ties in position order
    assert torch.equal(ops.sort_by_bucket(buckets), expected)
    assert torch.equal(ops.sort_by_bucket(torch.zeros(1, 5, dtype=torch.long)), torch.arange(5).view(1, 5))


def test_invert_permutation():
    permutation = torch.tensor([1, 4, 3, 0, 2])
    inverse = ops.invert_permutation(permutation)
    assert inverse.tolist() == [3, 0, 4, 2, 1]
    assert torch.equal(permutation[inverse], torch.arange(5)) and torch.equal(inverse[permutation], torch.arange(5))


def test_unsorting_restores_the_positions_gathered_in_bucket_order():
    """Each element of B, L, H*D vectors (float64) holds its own coordinates, 1000 b + 100 l + 10 h + d, so
    any misplaced element shows. Gathered in bucket order, then unsorted with the inverse permutation, every
    round returns the vectors in position order, heads split: B, L, H, N, D."""
    batch, length, heads, rounds, head_size = 2, 6, 3, 2, 4
    b, l, h, d = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in (batch, length, heads, head_size)),
                                indexing="ij")
    vectors = (1000 * b + 100 * l + 10 * h + d).reshape(batch, length, heads * head_size)
    generator = torch.Generator().manual_seed(0)
    buckets = torch.randint(0, 3, (batch, heads, rounds, length), generator=generator)
    sorted_positions = ops.sort_by_bucket(buckets)  # B, H, N, L
    sorted_vectors = gather_by_position(vectors, sorted_positions)  # B, H, N, L, D
    assert sorted_vectors[1, 2, 1, 0, 3] == 1000 + 100 * sorted_positions[1, 2, 1, 0] + 20 + 3
    unsorted = unsort_by_position(sorted_vectors, ops.invert_permutation(sorted_positions))
    expected = vectors.view(batch, length, heads, 1, head_size).expand(-1, -1, -1, rounds, -1)
    assert torch.equal(unsorted, expected)


# ----- combining rounds -----

def test_rounds_over_disjoint_keys_combine_into_one_softmax_over_all_keys():
    """Round 0 attends to keys 0-1, round 1 to keys 2-4: weighted by each round's share of the attention mass
    (its log-normaliser, the log-sum-exp of its scores), the rounds give the softmax over all five keys.
    Tolerance: combine_rounds computes the weights in fp32 (see its docstring); casting the log-normalisers
    (|l| <= M = 3) to fp32, subtracting their maximum, exp, the sum and the division each cost at most a few
    units u = 2^-24 of the weight, together below (8 M + 6) u < 8 (1 + M) eps_fp32 relative to each weight
    w_n; the float64 softmaxes and sums add ~1e-16. So |combined - direct| <= 8 (1 + M) eps_fp32
    sum_n w_n |out_n|."""
    generator = torch.Generator().manual_seed(1)
    scores = torch.tensor([[0.5, -1.0, 2.0, 0.0, 1.0], [-2.0, 1.5, 0.25, 1.0, -0.5]], dtype=torch.float64)  # Q, 5
    values = torch.randn(5, 3, generator=generator, dtype=torch.float64)  # 5 keys, D = 3
    rounds = [slice(0, 2), slice(2, 5)]
    out = torch.stack([torch.softmax(scores[:, keys], -1) @ values[keys] for keys in rounds], dim=-2)  # Q, N, D
    log_normalizer = torch.stack([torch.logsumexp(scores[:, keys], -1) for keys in rounds], dim=-1)  # Q, N
    assert log_normalizer.abs().max() <= 3
    combined = combine_rounds(out, log_normalizer, torch.tensor(False))
    direct = torch.softmax(scores, -1) @ values
    weights = torch.exp(log_normalizer - torch.logsumexp(log_normalizer, -1, keepdim=True))
    bound = 8 * (1 + 3) * torch.finfo(torch.float32).eps * (weights.unsqueeze(-1) * out.abs()).sum(-2)
    assert ((combined - direct).abs() <= bound).all(), (combined - direct).abs().max()


@pytest.mark.parametrize("with_log_normalizer", [False, True])
def test_a_single_round_is_taken_as_it_is(with_log_normalizer):
    """One round: the model passes no log-normaliser; given one, its weight, a softmax over one round, is
    exp(0) / exp(0) = 1 exactly."""
    out = torch.randn(2, 3, 1, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)  # ..., N, D
    log_normalizer = torch.tensor([[[-1e5], [0.3], [7.0]]] * 2, dtype=torch.float64) if with_log_normalizer else None
    assert torch.equal(combine_rounds(out, log_normalizer, torch.tensor(False)), out[..., 0, :])


@pytest.mark.parametrize("rounds", [2, 4])
def test_rounds_that_saw_only_the_query_itself_give_its_output_exactly(rounds):
    """A query whose only key is itself has the self-mask value -1e5 as its log-normaliser in every round,
    and the same output. fp32's spacing at 1e5 is 0.0078, so the weights may not be formed from a value
    rounded at that magnitude (exp(l - logsumexp(l)) gave 0.4989 for two rounds); subtracting the largest
    l leaves zeros, and 1/N, its products and their sums are exact for N a power of two."""
    out = torch.randn(3, 1, 4, generator=torch.Generator().manual_seed(4)).expand(3, rounds, 4)  # ..., N, D
    log_normalizer = torch.full((3, rounds), SELF_MASK_VALUE[torch.float32])
    assert torch.equal(combine_rounds(out, log_normalizer, torch.tensor(False)), out[..., 0, :])


def test_unchunked_input_takes_round_zero():
    """Every round saw the same keys: round 0 as it is, whatever the log-normalisers."""
    out = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)  # ..., N, D
    log_normalizer = torch.tensor([[-1e5, -1e5], [0.0, 2.0], [1.0, -1.0]], dtype=torch.float64)
    assert torch.equal(combine_rounds(out, log_normalizer, torch.tensor(True)), out[..., 0, :])

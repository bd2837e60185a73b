"""Generation as eager PyTorch (`reformer.generation`) and ONNX Runtime (`reformer.runtime`) both run it, numpy
only, so that both give the same tokens from the same logits and seed:

- `Prompts`: a batch of prompts of any lengths (a ragged list, or a left-padded array and its attention mask);
- `TokenChooser`: the next token (repetition penalty, then greedy, or sampling with temperature, top-k and
  top-p) and stopping at the end-of-sequence token;
- `generation_steps`: the loop over a `CachedDecoding` (eager or ONNX Runtime), yielding each step's tokens;
- `check_generation_length`: the length limit.

Prompts of different lengths: Reformer's chunked attention depends on where a position sits in its own row
(local attention's chunk boundaries, the wrap-around of LSH's bucket order at the row's end), so one prefill
over left-padded rows would not compute what each row computes alone. Rows are therefore prefilled in groups of
equal length, exactly as alone; `left_pad_caches` then aligns their caches at the right, in front of the
longest prompt, and records each row's padding in the cache tensor `left_padding`, which the decoder step
uses for its positions and keys. Every row's tokens are those of generating it alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Iterator, Protocol, Sequence

import numpy as np

# The cache tensor holding, per row, the number of padding positions in front of its first token.
LEFT_PADDING = "left_padding"
# The name of the cache tensors' axis of positions in their described shapes.
PAST_LENGTH = "past_length"
# The file of a causal-lm-with-past export that says how to drive its graphs (the exporters write it, the
# runtimes read it).
DECODER_CONFIG_NAME = "decoder_config.json"


@dataclass(frozen=True)
class Prompts:
    """ids B, T int64: the prompts aligned at the right (any padding on the left); lengths B: row r's prompt
    is its last lengths[r] ids."""

    ids: np.ndarray
    lengths: np.ndarray

    @classmethod
    def from_inputs(cls, input_ids, attention_mask=None, pad_token_id: int | None = 0) -> "Prompts":
        """input_ids: an int array B, T, left-padded where `attention_mask` (B, T, 1 for prompt tokens) has
        zeros, or a list of token-id lists of any lengths (no mask: they are left-padded with pad_token_id)."""
        if not isinstance(input_ids, np.ndarray):
            rows = [np.asarray(row) for row in input_ids]
            if any(row.ndim != 1 for row in rows):
                raise ValueError("input_ids must be a 2-D array (batch, prompt length) or a list of token-id lists")
            if len({len(row) for row in rows}) > 1:
                if attention_mask is not None:
                    raise ValueError("attention_mask goes with a 2-D array of ids: leave it out for a list of "
                                     "prompts of different lengths")
                return cls.left_padded(rows, 0 if pad_token_id is None else pad_token_id)
            input_ids = np.stack(rows) if rows else np.zeros((0, 0), dtype=np.int64)
        if input_ids.ndim != 2 or 0 in input_ids.shape:
            raise ValueError(f"input_ids must be 2-D (batch, prompt length), non-empty, got shape {input_ids.shape}")
        if not np.issubdtype(input_ids.dtype, np.integer):
            raise ValueError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        ids = input_ids.astype(np.int64)
        if attention_mask is None:
            return cls(ids, np.full(len(ids), ids.shape[1], dtype=np.int64))
        mask = np.asarray(attention_mask) != 0
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {mask.shape}, input_ids have {ids.shape}")
        lengths = mask.sum(axis=1)
        if (lengths == 0).any() or (mask != cls.prompt_positions(ids.shape[1], lengths)).any():
            raise ValueError("attention_mask must pad on the left: every row zeros, then ones, at least one 1 "
                             "(pad prompts on the left, as for transformers' decoder-only models)")
        return cls(ids, lengths.astype(np.int64))

    @classmethod
    def left_padded(cls, rows: Sequence[np.ndarray], pad_token_id: int) -> "Prompts":
        lengths = np.array([len(row) for row in rows], dtype=np.int64)
        if lengths.min() == 0:
            raise ValueError("every prompt needs at least one token")
        ids = np.full((len(rows), lengths.max()), pad_token_id, dtype=np.int64)
        for index, row in enumerate(rows):
            ids[index, ids.shape[1] - len(row):] = row
        return cls(ids, lengths)

    @staticmethod
    def prompt_positions(width: int, lengths: np.ndarray) -> np.ndarray:
        """B, width bool: where the prompts' tokens are (the last lengths[r] columns of row r)."""
        return np.arange(width) >= width - lengths[:, None]

    @property
    def longest(self) -> int:
        return int(self.lengths.max())

    def length_groups(self) -> list[tuple[int, np.ndarray]]:
        """(length, row indices) for every distinct prompt length, longest first."""
        return [(int(length), np.flatnonzero(self.lengths == length)) for length in np.unique(self.lengths)[::-1]]

    def followed_by(self, tokens: np.ndarray) -> "Prompts":
        """These prompts with tokens B, N appended to every row."""
        return Prompts(np.concatenate([self.ids, tokens], axis=1), self.lengths + tokens.shape[1])

    def check_vocabulary(self, vocab_size: int) -> None:
        check_in_vocabulary(self.ids[self.prompt_positions(self.ids.shape[1], self.lengths)], vocab_size)


def check_in_vocabulary(tokens: np.ndarray, vocab_size: int) -> None:
    """ValueError naming the first token id outside 0 .. vocab_size - 1."""
    outside = tokens[(tokens < 0) | (tokens >= vocab_size)]
    if outside.size:
        raise ValueError(f"token id {outside[0]} is outside the vocabulary: ids must be 0 to {vocab_size - 1}")


@dataclass
class TokenChooser:
    """The next token of every row from its logits (B, V):

    - `repetition_penalty` (1: none): the logit of every token already in the row (prompt or generated) is
      divided by it where positive and multiplied by it where negative (CTRL; transformers' rule);
    - then do_sample False: argmax (the first maximum on ties, as torch.argmax). do_sample True: the logits are
      divided by `temperature`, and a token is drawn, from a numpy generator seeded with `seed`, from the
      softmax restricted to the `top_k` most likely tokens and then to the smallest set whose probability
      reaches `top_p` (the most likely token is always kept). Temperature, top-k and top-p only change
      sampling, as in transformers;
    - a row that produced `eos_token_id` continues with `pad_token_id` (the eos id when None)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    rng: np.random.Generator = field(init=False, repr=False)
    finished: np.ndarray | None = field(init=False, default=None, repr=False)
    # B, V: the tokens each row holds so far (only with a repetition penalty).
    seen: np.ndarray | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature} (for greedy decoding leave "
                             f"do_sample False)")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be positive (1: none), got {self.repetition_penalty}")
        self.rng = np.random.default_rng(self.seed)

    @classmethod
    def from_options(cls, options: dict, pad_token_id: int | None) -> "TokenChooser":
        """A chooser from `generate`'s keyword options; pad_token_id: the model's, unless the options give one."""
        known = [option.name for option in fields(cls) if option.init]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"unknown generation option {unknown[0]!r}: the options are {', '.join(known)}")
        return cls(**{"pad_token_id": pad_token_id, **options})

    def start(self, prompts: Prompts, vocab_size: int) -> None:
        """Begin a generation from `prompts` (their tokens count for the repetition penalty)."""
        self.finished = None
        self.seen = None
        if self.repetition_penalty != 1.0:
            self.seen = np.zeros((len(prompts.ids), vocab_size), dtype=bool)
            in_prompt = Prompts.prompt_positions(prompts.ids.shape[1], prompts.lengths)
            self.seen[np.nonzero(in_prompt)[0], prompts.ids[in_prompt]] = True

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """logits B, V (any float dtype) -> token ids B (int64)."""
        logits = np.asarray(logits, dtype=np.float64)
        if self.repetition_penalty != 1.0:
            if self.seen is None:
                raise ValueError("a repetition penalty needs the prompts: call start(prompts, vocab_size) first")
            logits = self.penalize(logits)
        tokens = self.choose(logits)
        if self.seen is not None:
            self.seen[np.arange(len(tokens)), tokens] = True
        if self.eos_token_id is None:
            return tokens
        if self.finished is None:
            self.finished = np.zeros(tokens.shape, dtype=bool)
        filler = self.eos_token_id if self.pad_token_id is None else self.pad_token_id
        tokens = np.where(self.finished, filler, tokens)
        self.finished |= tokens == self.eos_token_id
        return tokens

    @property
    def all_finished(self) -> bool:
        """Every row has produced the eos token: generation can stop."""
        return self.finished is not None and bool(self.finished.all())

    def penalize(self, logits: np.ndarray) -> np.ndarray:
        """B, V -> B, V with the repetition penalty applied to the tokens each row holds."""
        penalized = np.where(logits < 0, logits * self.repetition_penalty, logits / self.repetition_penalty)
        return np.where(self.seen, penalized, logits)

    def choose(self, logits: np.ndarray) -> np.ndarray:
        if not self.do_sample:
            return np.argmax(logits, axis=-1).astype(np.int64)
        probs = self.filtered_probabilities(logits / self.temperature)
        # Inverse-CDF sampling: one uniform draw per row.
        cumulative = np.cumsum(probs, axis=-1)
        draws = self.rng.random((logits.shape[0], 1)) * cumulative[:, -1:]
        return np.minimum((cumulative <= draws).sum(axis=-1), logits.shape[-1] - 1).astype(np.int64)

    def filtered_probabilities(self, logits: np.ndarray) -> np.ndarray:
        """B, V -> B, V unnormalised probabilities, zero outside the top-k / top-p set."""
        probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
        # Stable descending order: ties keep the lower token id first, as a stable sort would.
        order = np.argsort(-logits, axis=-1, kind="stable")
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        keep = np.ones_like(sorted_probs, dtype=bool)
        if self.top_k is not None:
            keep[:, self.top_k:] = False
        if self.top_p is not None:
            kept = np.where(keep, sorted_probs, 0.0)
            mass_before = np.cumsum(kept, axis=-1) - kept
            keep &= mass_before < self.top_p * kept.sum(axis=-1, keepdims=True)
        kept_sorted = np.where(keep, sorted_probs, 0.0)
        filtered = np.empty_like(probs)
        np.put_along_axis(filtered, order, kept_sorted, axis=-1)
        return filtered


class CachedDecoding(Protocol):
    """What `generation_steps` drives: the prefill and decoder-step passes of eager PyTorch or of the exported
    graphs. A cache is a list of tensors in the order of `cache_tensors`, in whatever form the runner keeps
    them (e.g. on a GPU); the `*_host` methods convert it to numpy arrays and back."""

    vocab_size: int
    max_length: int  # the longest sequence it serves, prompt and new tokens
    max_length_name: str  # what sets max_length, for error messages
    # name -> {"dtype", "shape" (with PAST_LENGTH for the axis of positions), "padding_value"}, in cache order
    # (decoder_config.json's `cache_tensors`).
    cache_tensors: dict[str, dict]

    def next_token_logits(self, kind: str, input_ids: np.ndarray, past: list) -> tuple[np.ndarray, list]:
        """kind "prefill" (past empty) or "step": (the logits at the last position, B, V, as a numpy array;
        the present cache)."""

    def cache_to_host(self, cache: list) -> list[np.ndarray]: ...

    def cache_from_host(self, arrays: list[np.ndarray]) -> list: ...


def generation_steps(decoding: CachedDecoding, prompts: Prompts, choose: TokenChooser, max_new_tokens: int,
                     use_cache: bool = True) -> Iterator[np.ndarray]:
    """Each step's new token of every row, B int64, up to max_new_tokens steps, until every row has produced the
    eos token. Without the cache, every step reruns the prefill over the whole sequence (the reference's
    use_cache=False). Arguments are checked here, the decoding runs as the steps are taken."""
    check_generation_length(decoding.max_length, decoding.max_length_name, prompts.longest, max_new_tokens)
    prompts.check_vocabulary(decoding.vocab_size)
    choose.start(prompts, decoding.vocab_size)
    return decoded_steps(decoding, prompts, choose, max_new_tokens, use_cache)


def decoded_steps(decoding: CachedDecoding, prompts: Prompts, choose: TokenChooser, max_new_tokens: int,
                  use_cache: bool) -> Iterator[np.ndarray]:
    logits, group_caches = prefill_by_length(decoding, prompts)
    cache = left_pad_caches(decoding, prompts, group_caches) if use_cache else None
    sequence = prompts
    for step in range(max_new_tokens):
        tokens = choose(logits)
        yield tokens
        if step == max_new_tokens - 1 or choose.all_finished:
            return
        if use_cache:
            logits, cache = decoding.next_token_logits("step", tokens[:, None], cache)
        else:
            sequence = sequence.followed_by(tokens[:, None])
            logits, _ = prefill_by_length(decoding, sequence)


def prefill_by_length(decoding: CachedDecoding, prompts: Prompts) -> tuple[np.ndarray, list[tuple[np.ndarray, list]]]:
    """The logits at every row's last prompt token (B, V), and per group of equal prompt length (see
    `Prompts.length_groups`) its rows and cache."""
    group_logits, group_caches = [], []
    for length, rows in prompts.length_groups():
        logits, cache = decoding.next_token_logits("prefill", prompts.ids[rows, -length:], [])
        group_logits.append(logits)
        group_caches.append((rows, cache))
    order = np.argsort(np.concatenate([rows for rows, _ in group_caches]))
    return np.concatenate(group_logits)[order], group_caches


def left_pad_caches(decoding: CachedDecoding, prompts: Prompts, group_caches: list[tuple[np.ndarray, list]]) -> list:
    """One cache for all rows from the caches of `prefill_by_length`'s groups: each group's positions are
    preceded by padding up to the longest prompt (tensors with positions take their `padding_value` there, the
    `left_padding` tensor counts it), and rows are back in the prompts' order."""
    if len(group_caches) == 1:
        return group_caches[0][1]
    longest = prompts.longest
    order = np.argsort(np.concatenate([rows for rows, _ in group_caches]))
    groups = [(longest - int(prompts.lengths[rows[0]]), decoding.cache_to_host(cache)) for rows, cache in group_caches]
    merged = []
    for index, (name, description) in enumerate(decoding.cache_tensors.items()):
        parts = []
        for padding, arrays in groups:
            array = arrays[index]
            if name == LEFT_PADDING:
                array = array + padding
            elif PAST_LENGTH in description["shape"]:
                widths = [(0, 0)] * array.ndim
                widths[description["shape"].index(PAST_LENGTH)] = (padding, 0)
                array = np.pad(array, widths, constant_values=description["padding_value"])
            parts.append(array)
        merged.append(np.concatenate(parts)[order])
    return decoding.cache_from_host(merged)


def check_generation_length(max_length: int, limit_name: str, prompt_length: int, max_new_tokens: int) -> None:
    """The last new token is predicted from position P + max_new_tokens - 2, which must be below max_length."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if prompt_length + max_new_tokens - 1 > max_length:
        raise ValueError(
            f"a prompt of {prompt_length} tokens plus {max_new_tokens} new tokens needs "
            f"{prompt_length + max_new_tokens - 1} positions; {limit_name} is {max_length}"
        )

// The next token of every row from its logits, as reformer/sampling.py's TokenChooser chooses it, and the batch
// of prompts of any lengths, as its Prompts holds them. Greedy choices equal Python's for equal logits; sampled
// ones come from another random generator (SplitMix64 here, numpy's PCG64 there), so the same seed draws other
// tokens than in Python.

// The option names of generate / stream, with their defaults (padTokenId: the model's when left out).
export const GENERATION_OPTIONS = {
  doSample: false,
  temperature: 1.0,
  topK: null,
  topP: null,
  repetitionPenalty: 1.0,
  seed: null,
  eosTokenId: null,
  padTokenId: null,
};

/** A batch of prompts of any lengths: `rows` (token-id lists), their `lengths`, the longest as `width`. Nothing
 * is padded: rows are prefilled in groups of equal length (cache.mjs aligns their caches). */
export class Prompts {
  constructor(rows) {
    if (!Array.isArray(rows) || rows.length === 0 || !rows.every(Array.isArray)) {
      throw new Error('prompts must be a non-empty list of token-id lists');
    }
    if (rows.some((row) => row.length === 0)) throw new Error('every prompt needs at least one token');
    for (const row of rows) {
      const bad = row.find((token) => !Number.isInteger(token));
      if (bad !== undefined) throw new Error(`token ids must be integers, got ${JSON.stringify(bad)}`);
    }
    this.rows = rows.map((row) => [...row]);
    this.lengths = rows.map((row) => row.length);
    this.width = Math.max(...this.lengths);
  }

  get batchSize() {
    return this.rows.length;
  }

  /** [length, row indices] for every distinct prompt length, longest first. */
  lengthGroups() {
    const lengths = [...new Set(this.lengths)].sort((a, b) => b - a);
    return lengths.map((length) => [length, this.lengths.flatMap((rowLength, row) => (rowLength === length ? [row] : []))]);
  }

  checkVocabulary(vocabSize) {
    for (const row of this.rows) {
      const outside = row.find((token) => token < 0 || token >= vocabSize);
      if (outside !== undefined) {
        throw new Error(`token id ${outside} is outside the vocabulary: ids must be 0 to ${vocabSize - 1}`);
      }
    }
  }
}

/** The last new token is predicted from position P + maxNewTokens - 2, which must be below maxLength. */
export function checkGenerationLength(maxLength, limitName, promptLength, maxNewTokens) {
  if (!Number.isInteger(maxNewTokens) || maxNewTokens < 1) {
    throw new Error(`maxNewTokens must be an integer of at least 1, got ${maxNewTokens}`);
  }
  if (promptLength + maxNewTokens - 1 > maxLength) {
    throw new Error(`a prompt of ${promptLength} tokens plus ${maxNewTokens} new tokens needs `
      + `${promptLength + maxNewTokens - 1} positions; ${limitName} is ${maxLength}`);
  }
}

/** Uniform doubles in [0, 1) from a seed (SplitMix64, Steele, Lea and Flood 2014); no seed: Math.random. */
export function randomSource(seed) {
  if (seed === null || seed === undefined) return Math.random;
  if (!Number.isSafeInteger(seed) || seed < 0) throw new Error(`seed must be a non-negative integer, got ${seed}`);
  const mask = (1n << 64n) - 1n;
  let state = BigInt(seed);
  return () => {
    state = (state + 0x9e3779b97f4a7c15n) & mask;
    let z = state;
    z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & mask;
    z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & mask;
    z ^= z >> 31n;
    return Number(z >> 11n) / 2 ** 53; // the top 53 bits
  };
}

/**
 * The next token of every row from its logits (B x V, row-major):
 * - repetitionPenalty (1: none): the logit of every token already in the row (prompt or generated) is divided
 *   by it where positive and multiplied by it where negative (transformers' rule);
 * - then greedy: the first maximum; or with doSample: the logits divided by temperature, a token drawn from
 *   the softmax restricted to the topK most likely tokens and then to the smallest set whose probability
 *   reaches topP (the most likely token is always kept);
 * - a row that produced eosTokenId continues with padTokenId (the eos id when null).
 */
export class TokenChooser {
  constructor(options, modelPadTokenId) {
    const unknown = Object.keys(options).filter((name) => !(name in GENERATION_OPTIONS)).sort();
    if (unknown.length) {
      throw new Error(`unknown generation option '${unknown[0]}': the options are ${Object.keys(GENERATION_OPTIONS).join(', ')}`);
    }
    Object.assign(this, GENERATION_OPTIONS, { padTokenId: modelPadTokenId }, withoutUndefined(options));
    if (!(this.temperature > 0)) {
      throw new Error(`temperature must be positive, got ${this.temperature} (for greedy decoding leave doSample false)`);
    }
    if (this.topK !== null && !(Number.isInteger(this.topK) && this.topK >= 1)) {
      throw new Error(`topK must be an integer of at least 1, got ${this.topK}`);
    }
    if (this.topP !== null && !(this.topP > 0 && this.topP <= 1)) throw new Error(`topP must be in (0, 1], got ${this.topP}`);
    if (!(this.repetitionPenalty > 0)) {
      throw new Error(`repetitionPenalty must be positive (1: none), got ${this.repetitionPenalty}`);
    }
    this.random = randomSource(this.seed);
    this.finished = null;
    this.seen = null;
  }

  /** Begin a generation from `prompts` (their tokens count for the repetition penalty). */
  start(prompts, vocabSize) {
    this.vocabSize = vocabSize;
    this.finished = null;
    this.seen = null;
    if (this.repetitionPenalty !== 1) {
      this.seen = prompts.rows.map((row) => {
        const seen = new Uint8Array(vocabSize);
        for (const token of row) seen[token] = 1;
        return seen;
      });
    }
  }

  /** logits: Float32Array B x V -> token ids, B numbers. */
  choose(logits) {
    const vocabSize = this.vocabSize;
    const batchSize = logits.length / vocabSize;
    const tokens = [];
    for (let row = 0; row < batchSize; row += 1) {
      const values = Float64Array.from(logits.subarray(row * vocabSize, (row + 1) * vocabSize));
      if (this.seen) penalize(values, this.seen[row], this.repetitionPenalty);
      tokens.push(this.doSample ? this.draw(values) : argmax(values));
      if (this.seen) this.seen[row][tokens[row]] = 1;
    }
    if (this.eosTokenId === null) return tokens;
    this.finished ??= new Array(batchSize).fill(false);
    const filler = this.padTokenId ?? this.eosTokenId;
    return tokens.map((token, row) => {
      const chosen = this.finished[row] ? filler : token;
      this.finished[row] ||= chosen === this.eosTokenId;
      return chosen;
    });
  }

  /** Every row has produced the eos token: generation can stop. */
  get allFinished() {
    return this.finished !== null && this.finished.every(Boolean);
  }

  /** One row's token drawn by inverse CDF (one uniform draw) from its filtered probabilities. */
  draw(values) {
    const probabilities = this.filteredProbabilities(values.map((value) => value / this.temperature));
    let total = 0;
    const cumulative = probabilities.map((probability) => (total += probability));
    const target = this.random() * total;
    const index = cumulative.findIndex((mass) => mass > target);
    return index === -1 ? values.length - 1 : index;
  }

  /** One row's unnormalised probabilities, zero outside the top-k / top-p set. */
  filteredProbabilities(values) {
    let largest = -Infinity;
    for (const value of values) largest = Math.max(largest, value);
    const probabilities = values.map((value) => Math.exp(value - largest));
    // Descending, ties keep the lower token id first (Array.prototype.sort is stable).
    const order = [...values.keys()].sort((a, b) => values[b] - values[a]);
    const kept = order.slice(0, this.topK ?? order.length);
    let keptMass = 0;
    for (const token of kept) keptMass += probabilities[token];
    const filtered = new Float64Array(values.length);
    let massBefore = 0;
    for (const token of kept) {
      if (this.topP !== null && !(massBefore < this.topP * keptMass)) break;
      filtered[token] = probabilities[token];
      massBefore += probabilities[token];
    }
    return filtered;
  }
}

function withoutUndefined(options) {
  return Object.fromEntries(Object.entries(options).filter(([, value]) => value !== undefined));
}

function penalize(values, seen, penalty) {
  for (let token = 0; token < values.length; token += 1) {
    if (seen[token]) values[token] = values[token] < 0 ? values[token] * penalty : values[token] / penalty;
  }
}

function argmax(values) {
  let best = 0;
  for (let token = 1; token < values.length; token += 1) if (values[token] > values[best]) best = token;
  return best;
}

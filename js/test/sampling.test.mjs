import assert from 'node:assert/strict';
import { test } from 'node:test';

import { Prompts, TokenChooser, randomSource } from '../src/sampling.mjs';

const logits = (...rows) => Float32Array.from(rows.flat());

function chooser(options, prompts = [[0]], vocabSize = 4) {
  const choose = new TokenChooser(options, 0);
  choose.start(new Prompts(prompts), vocabSize);
  return choose;
}

test('greedy takes the first maximum of each row', () => {
  assert.deepEqual(chooser({}).choose(logits([1, 3, 3, 0], [5, 1, 2, 5])), [1, 0]);
});

test('the repetition penalty divides positive and multiplies negative logits of tokens in the row', () => {
  // Token 0 (in the prompt) at 2.4 becomes 2.4 / 2 = 1.2 < 1.5; token 3 at -0.1 stays above token 2 at -0.5.
  assert.deepEqual(chooser({ repetitionPenalty: 2 }, [[0, 2]]).choose(logits([2.4, 1.5, -0.5, -0.1])), [1]);
  assert.deepEqual(chooser({ repetitionPenalty: 2 }, [[0]]).choose(logits([2.4, 1.0, -0.5, -0.1])), [0]);
});

test('top-k and top-p keep the most likely tokens, ties in token order, at least one', () => {
  // Probabilities 1 : 4 : 4 : 2, returned relative to the largest.
  const values = Float64Array.from([0, Math.log(4), Math.log(4), Math.log(2)]);
  const filtered = (options) => [...chooser({ doSample: true, ...options }).filteredProbabilities(values)].map((p) => p * 4);
  assert.deepEqual(filtered({ topK: 2 }), [0, 4, 4, 0]);
  assert.deepEqual(filtered({ topP: 0.5 }), [0, 4, 4, 0]); // 4 / 11 is below a half, 8 / 11 reaches it
  assert.deepEqual(filtered({ topP: 0.01 }), [0, 4, 0, 0]);
  assert.deepEqual(filtered({ topK: 3, topP: 0.9 }), [0, 4, 4, 2]); // of the top 3's mass 10, 8 is below 9
});

test('after the end token a row continues with padding', () => {
  const choose = chooser({ eosTokenId: 2, padTokenId: 0 }, [[1], [1]]);
  assert.deepEqual(choose.choose(logits([0, 0, 9, 0], [0, 9, 0, 0])), [2, 1]);
  assert.equal(choose.allFinished, false);
  assert.deepEqual(choose.choose(logits([0, 9, 0, 0], [0, 0, 9, 0])), [0, 2]);
  assert.equal(choose.allFinished, true);
});

test('a seeded source repeats its draws, in [0, 1)', () => {
  const draws = (seed) => Array.from({ length: 1000 }, randomSource(seed));
  assert.deepEqual(draws(5), draws(5));
  assert.notDeepEqual(draws(5), draws(6));
  assert.ok(draws(5).every((value) => value >= 0 && value < 1));
  const mean = draws(9).reduce((a, b) => a + b) / 1000;
  assert.ok(Math.abs(mean - 0.5) < 0.05, `mean ${mean}`);
});

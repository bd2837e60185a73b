import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { BACKENDS, FIXTURE, expected } from './fixture.mjs';

const options = { maxNewTokens: expected.max_new_tokens };

for (const [backend, load] of Object.entries(BACKENDS)) {
  describe(`generation on ${backend}`, () => {
    let generator;
    before(async () => { generator = await load(FIXTURE); });
    after(() => generator.release());

    test('greedy ids of prompts of different lengths in one batch equal Python\'s', async () => {
      const result = await generator.generate(expected.prompt_ids, options);
      assert.deepEqual(result.ids, expected.greedy);
      assert.deepEqual(result.promptIds, expected.prompt_ids);
    });

    test('each row generates what it generates alone', async () => {
      for (const [row, ids] of expected.prompt_ids.entries()) {
        assert.deepEqual((await generator.generate(ids, options)).ids, [expected.greedy[row]]);
      }
    });

    test('first-step logits are within 1e-5 of Python\'s ONNX Runtime', async () => {
      const { value: first } = await generator.stream(expected.prompt_ids, options).next();
      const vocab = generator.vocabSize;
      expected.first_logits.forEach((row, index) => {
        const worst = Math.max(...row.map((value, token) => Math.abs(first.logits[index * vocab + token] - value)));
        assert.ok(worst <= 1e-5, `row ${index}: logits differ by ${worst}`);
      });
    });

    test('a repetition penalty and an end token follow Python', async () => {
      const penalized = await generator.generate(expected.prompt_ids, { ...options, repetitionPenalty: expected.repetition_penalty });
      assert.deepEqual(penalized.ids, expected.greedy_with_repetition_penalty);
      const stopped = await generator.generate(expected.prompt_ids, { ...options, eosTokenId: expected.eos_token_id });
      assert.deepEqual(stopped.ids, expected.greedy_with_eos);
    });

    test('text prompts are encoded as bytes and new tokens decoded', async () => {
      const result = await generator.generate(expected.prompts, options);
      assert.deepEqual(result.ids, expected.greedy);
      assert.deepEqual(result.texts, expected.text);
    });
  });
}

describe('sampling', () => {
  let generator;
  before(async () => { generator = await BACKENDS.node(FIXTURE); });
  after(() => generator.release());

  test('top-k 1 samples what greedy decoding chooses', async () => {
    const result = await generator.generate(expected.prompt_ids, { ...options, doSample: true, topK: 1, temperature: 0.5, seed: 3 });
    assert.deepEqual(result.ids, expected.greedy);
  });

  test('a seed reproduces its tokens, and another seed draws others', async () => {
    const sample = (seed) => generator.generate(expected.prompt_ids, { ...options, doSample: true, topP: 0.9, seed });
    const first = await sample(7);
    assert.deepEqual((await sample(7)).ids, first.ids);
    assert.notDeepEqual((await sample(8)).ids, first.ids);
  });

  test('generation stops once every row has produced the end token', async () => {
    const [row] = expected.greedy;
    const result = await generator.generate([expected.prompt_ids[0]], { ...options, eosTokenId: row[1] });
    assert.deepEqual(result.ids, [row.slice(0, row.indexOf(row[1]) + 1)]);
  });

  test('the stream yields what generate returns, its texts adding up to the decoded tokens', async () => {
    const steps = [];
    for await (const step of generator.stream(expected.prompts, options)) steps.push(step);
    assert.equal(steps.length, expected.max_new_tokens);
    assert.deepEqual(expected.greedy.map((_, row) => steps.map((step) => step.tokens[row])), expected.greedy);
    assert.deepEqual(expected.text.map((_, row) => steps.map((step) => step.texts[row]).join('')), expected.text);
  });

  test('bad arguments are refused at once, with the reason', () => {
    const refused = [
      [{ maxNewTokens: 0 }, /maxNewTokens must be an integer of at least 1/],
      [{ maxNewTokens: generator.maxLength }, /needs \d+ positions; the export's max_length is/],
      [{ maxNewTokens: 2, temperature: 0 }, /temperature must be positive/],
      [{ maxNewTokens: 2, topP: 1.5 }, /topP must be in \(0, 1\]/],
      [{ maxNewTokens: 2, topK: 0 }, /topK must be an integer of at least 1/],
      [{ maxNewTokens: 2, repetitionPenalty: 0 }, /repetitionPenalty must be positive/],
      [{ maxNewTokens: 2, seed: -1 }, /seed must be a non-negative integer/],
      [{ maxNewTokens: 2, top_k: 3 }, /unknown generation option 'top_k'/],
    ];
    for (const [bad, message] of refused) assert.throws(() => generator.stream([[5, 6]], bad), message);
    assert.throws(() => generator.stream([[5, 999]], { maxNewTokens: 2 }), /token id 999 is outside the vocabulary/);
    assert.throws(() => generator.stream([[]], { maxNewTokens: 2 }), /every prompt needs at least one token/);
  });
});

import assert from 'node:assert/strict';
import { copyFile, mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';

import { load } from '../src/node.mjs';
import { Generator } from '../src/generator.mjs';
import { TextStream, byteText, textFor } from '../src/text.mjs';
import { FIXTURE, expected } from './fixture.mjs';

describe('byte vocabulary (as reformer/tokenizer.py)', () => {
  test('id = byte + 2 for the UTF-8 bytes', () => {
    assert.deepEqual(byteText.encode('aé'), [97 + 2, 0xc3 + 2, 0xa9 + 2]);
    assert.equal(byteText.decode(byteText.encode('naïve ✓')), 'naïve ✓');
  });

  test('padding and end ids decode to nothing; a cut character to U+FFFD', () => {
    assert.equal(byteText.decode([0, 1, 99, 1, 0]), 'a');
    assert.equal(byteText.decode([0xc3 + 2]), '\uFFFD');
    assert.throws(() => byteText.decode([258]), /token id 258 is outside the byte vocabulary 0..257/);
  });

  test('a stream holds back the first byte of a character until the next completes it', () => {
    const stream = new TextStream(byteText, 1);
    assert.deepEqual(stream.add([0xc3 + 2]), ['']);
    assert.deepEqual(stream.add([0xa9 + 2]), ['é']);
    assert.deepEqual(stream.add([0xe2 + 2]), ['']);
    assert.deepEqual(stream.flush(), ['\uFFFD']);
  });
});

describe('a folder with tokenizer.json', () => {
  let folder;
  let generator;
  before(async () => {
    folder = await mkdtemp(path.join(tmpdir(), 'reformer-tokenizer-'));
    for (const file of await readdir(FIXTURE)) {
      if (file.endsWith('.onnx') || file === 'decoder_config.json') await copyFile(path.join(FIXTURE, file), path.join(folder, file));
    }
    await copyFile(path.join(FIXTURE, 'unigram', 'tokenizer.json'), path.join(folder, 'tokenizer.json'));
    generator = await load(folder);
  });
  after(async () => {
    await generator.release();
    await rm(folder, { recursive: true });
  });

  test('encodes and decodes as Python\'s tokenizers, and generates Python\'s ids', async () => {
    const { prompts, prompt_ids: promptIds, greedy, text } = expected.tokenizer;
    assert.equal(generator.text.kind, 'tokenizer.json');
    const result = await generator.generate(prompts, { maxNewTokens: expected.max_new_tokens });
    assert.deepEqual(result.promptIds, promptIds);
    assert.deepEqual(result.ids, greedy);
    assert.deepEqual(result.texts, text);
  });
});

test('without tokenizer.json only a vocabulary of 258 has text, others take ids only', () => {
  assert.equal(textFor(258, null), byteText);
  assert.equal(textFor(30, null), null);
  const generator = new Generator(null, { vocab_size: 30, cache: [], cache_tensors: {} }, {}, null, 'a-folder');
  assert.deepEqual(generator.promptIds([[3, 4], [5]]), [[3, 4], [5]]);
  assert.throws(() => generator.promptIds('hello'), /^Error: a-folder has no tokenizer \(vocabulary 30, no tokenizer.json\): give token ids, not text$/);
});

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { test } from 'node:test';
import { promisify } from 'node:util';

import { FIXTURE, expected } from './fixture.mjs';

const COMMAND = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'bin', 'generate.mjs');

async function generate(...args) {
  try {
    const { stdout, stderr } = await promisify(execFile)(process.execPath, [COMMAND, ...args]);
    return { code: 0, stdout, stderr };
  } catch (error) {
    return { code: error.code, stdout: error.stdout, stderr: error.stderr };
  }
}

test('--json prints the prompts\' ids, the new ids and their text', async () => {
  const prompts = expected.prompts.flatMap((prompt) => ['--prompt', prompt]);
  const { code, stdout } = await generate(FIXTURE, ...prompts, '--max-new-tokens', String(expected.max_new_tokens), '--json');
  assert.equal(code, 0);
  assert.deepEqual(JSON.parse(stdout), { prompt_ids: expected.prompt_ids, ids: expected.greedy, text: expected.text });
});

test('one prompt streams as text, several print a JSON string each; --ids takes token ids', async () => {
  const { stdout } = await generate(FIXTURE, '--prompt', expected.prompts[0], '--max-new-tokens', String(expected.max_new_tokens));
  assert.equal(stdout, `${expected.prompts[0]}${expected.text[0]}\n`);
  const two = await generate(FIXTURE, '--prompt', expected.prompts[0], '--prompt', expected.prompts[1], '--max-new-tokens',
    String(expected.max_new_tokens));
  assert.deepEqual(two.stdout.trim().split('\n').map((line) => JSON.parse(line)),
    [0, 1].map((row) => expected.prompts[row] + expected.text[row]));
  const ids = await generate(FIXTURE, '--ids', expected.prompt_ids[1].join(','), '--max-new-tokens', '3',
    '--repetition-penalty', String(expected.repetition_penalty), '--json');
  assert.deepEqual(JSON.parse(ids.stdout).ids, [expected.greedy_with_repetition_penalty[1].slice(0, 3)]);
});

test('bad input: one line on stderr, exit status 2', async () => {
  const cases = [
    [[FIXTURE], /give a prompt: --prompt TEXT or --ids/],
    [[FIXTURE, '--prompt', 'a', '--max-new-tokens', 'many'], /--max-new-tokens takes an integer, got "many"/],
    [[FIXTURE, '--prompt', 'a', '--top-p', '2', '--sample'], /topP must be in \(0, 1\]/],
    [[FIXTURE, '--ids', '5,x'], /--ids takes comma-separated integers/],
    [[FIXTURE, '--prompt', 'a', '--frobnicate'], /Unknown option '--frobnicate'/],
    [[path.join(FIXTURE, 'missing'), '--prompt', 'a'], /no decoder_config.json in .*missing: export with --task causal-lm-with-past/],
  ];
  for (const [args, message] of cases) {
    const { code, stdout, stderr } = await generate(...args);
    assert.equal(code, 2, args.join(' '));
    assert.equal(stdout, '');
    assert.match(stderr, /^generate\.mjs: error: [^\n]*\n$/);
    assert.match(stderr, message);
  }
});

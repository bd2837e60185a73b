#!/usr/bin/env node
// Generate from an exported causal-lm-with-past folder on onnxruntime-node:
//   node js/bin/generate.mjs FOLDER --prompt TEXT --max-new-tokens N [--json] [sampling options]
import { parseArgs } from 'node:util';

import { load, loadOnWasm } from '../src/node.mjs';

const USAGE = `usage: generate.mjs FOLDER (--prompt TEXT | --ids 5,17,42)... [options]

  FOLDER                    a folder written by reformer-export --format onnx --task causal-lm-with-past
  --prompt TEXT             a prompt (repeat for a batch; prompts may differ in length)
  --ids I,J,...             a prompt as token ids (for models without a tokenizer; repeatable)
  --max-new-tokens N        new tokens per prompt (default 32)
  --sample                  sample instead of greedy decoding
  --temperature T           divide the logits by T before sampling (default 1)
  --top-k K                 sample among the K most likely tokens
  --top-p P                 sample among the most likely tokens whose probability reaches P
  --repetition-penalty R    penalise tokens already in the row (transformers' rule; 1: none)
  --seed S                  seed of the sampler (JavaScript's generator: not the tokens Python draws)
  --eos-token-id ID         stop a row at this token (the model's is in decoder_config.json)
  --threads N               ONNX Runtime intra-op threads (default: one per core; node backend)
  --backend node|wasm       onnxruntime-node (default) or onnxruntime-web's WebAssembly, as in browsers
  --json                    print {"prompt_ids", "ids" (new tokens per prompt), "text"} instead of text`;

const BACKENDS = { node: load, wasm: loadOnWasm };

const OPTIONS = {
  prompt: { type: 'string', multiple: true },
  ids: { type: 'string', multiple: true },
  'max-new-tokens': { type: 'string', default: '32' },
  sample: { type: 'boolean', default: false },
  temperature: { type: 'string' },
  'top-k': { type: 'string' },
  'top-p': { type: 'string' },
  'repetition-penalty': { type: 'string' },
  seed: { type: 'string' },
  'eos-token-id': { type: 'string' },
  threads: { type: 'string' },
  backend: { type: 'string', default: 'node' },
  json: { type: 'boolean', default: false },
  help: { type: 'boolean', short: 'h', default: false },
};

function number(values, name, integer) {
  const text = values[name];
  if (text === undefined) return undefined;
  const value = Number(text);
  if (text.trim() === '' || !Number.isFinite(value) || (integer && !Number.isInteger(value))) {
    throw new Error(`--${name} takes ${integer ? 'an integer' : 'a number'}, got ${JSON.stringify(text)}`);
  }
  return value;
}

function idList(text) {
  const ids = text.split(',').map((part) => Number(part.trim()));
  if (text.trim() === '' || ids.some((id) => !Number.isInteger(id))) {
    throw new Error(`--ids takes comma-separated integers, got ${JSON.stringify(text)}`);
  }
  return ids;
}

function parse(argv) {
  const { values, positionals } = parseArgs({ args: argv, options: OPTIONS, allowPositionals: true });
  if (values.help) return { help: true };
  if (positionals.length !== 1) throw new Error(`give one FOLDER, got ${positionals.length} (--help for usage)`);
  const prompts = [...(values.prompt ?? []), ...(values.ids ?? []).map(idList)];
  if (prompts.length === 0) throw new Error('give a prompt: --prompt TEXT or --ids I,J,...');
  const options = {
    maxNewTokens: number(values, 'max-new-tokens', true),
    doSample: values.sample,
    temperature: number(values, 'temperature', false),
    topK: number(values, 'top-k', true),
    topP: number(values, 'top-p', false),
    repetitionPenalty: number(values, 'repetition-penalty', false),
    seed: number(values, 'seed', true),
    eosTokenId: number(values, 'eos-token-id', true),
  };
  const threads = number(values, 'threads', true);
  const backend = BACKENDS[values.backend];
  if (!backend) throw new Error(`--backend is node or wasm, not ${JSON.stringify(values.backend)}`);
  return { folder: positionals[0], prompts, options, json: values.json, threads, backend };
}

async function main(argv) {
  const request = parse(argv);
  if (request.help) {
    console.log(USAGE);
    return;
  }
  const generator = await request.backend(request.folder, request.threads ? { intraOpNumThreads: request.threads } : {});
  if (request.json) {
    const result = await generator.generate(request.prompts, request.options);
    console.log(JSON.stringify({ prompt_ids: result.promptIds, ids: result.ids, text: result.texts }));
  } else if (request.prompts.length === 1 && generator.text) {
    // One prompt: its text, then the new text as it comes.
    const stream = generator.stream(request.prompts, request.options);
    process.stdout.write(typeof request.prompts[0] === 'string' ? request.prompts[0] : generator.text.decode(request.prompts[0]));
    for await (const step of stream) process.stdout.write(step.texts[0]);
    process.stdout.write('\n');
  } else {
    // Several prompts (or no tokenizer): each row, prompt and new tokens, once done, as a JSON string or ids.
    const result = await generator.generate(request.prompts, request.options);
    result.ids.forEach((ids, row) => {
      const all = [...result.promptIds[row], ...ids];
      console.log(JSON.stringify(generator.text ? generator.text.decode(all) : all));
    });
  }
  await generator.release();
}

main(process.argv.slice(2)).catch((error) => {
  const message = String(error?.message ?? error).split('\n')[0];
  console.error(`generate.mjs: error: ${message}`);
  process.exit(2);
});

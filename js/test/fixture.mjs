// The committed fixture (scripts/js_fixture.py writes it): the built-in tiny model's causal-lm-with-past ONNX
// graphs and what Python's OnnxGenerator generated from them. Loaded on both backends: onnxruntime-node and
// onnxruntime-web's WebAssembly (which runs in Node too).
import { readFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import * as ortWeb from 'onnxruntime-web';

import { loadGenerator } from '../src/generator.mjs';
import { folderSource, load } from '../src/node.mjs';

export const FIXTURE = path.join(path.dirname(fileURLToPath(import.meta.url)), 'fixtures', 'tiny');
export const expected = JSON.parse(readFileSync(path.join(FIXTURE, 'expected.json'), 'utf8'));

ortWeb.env.wasm.numThreads = 1;

export const BACKENDS = {
  node: (folder) => load(folder),
  // onnxruntime-web as the browser runs it, with the model bytes handed over (no fetch of file paths in Node).
  wasm: (folder) => loadGenerator(ortWeb, { ...folderSource(folder), model: (file) => readFile(path.join(folder, file)) },
    { executionProviders: ['wasm'] }),
};

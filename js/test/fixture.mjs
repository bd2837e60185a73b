// The committed fixture (scripts/js_fixture.py writes it): the built-in tiny model's causal-lm-with-past ONNX
// graphs and what Python's OnnxGenerator generated from them. Loaded on both backends: onnxruntime-node and
// onnxruntime-web's WebAssembly (which runs in Node too).
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { load, loadOnWasm } from '../src/node.mjs';

export const FIXTURE = path.join(path.dirname(fileURLToPath(import.meta.url)), 'fixtures', 'tiny');
export const expected = JSON.parse(readFileSync(path.join(FIXTURE, 'expected.json'), 'utf8'));

export const BACKENDS = { node: load, wasm: loadOnWasm };

// Node.js entry: an exported folder (a path) on onnxruntime-node, or on onnxruntime-web's WebAssembly backend
// (the browser's runtime, to check a folder for web pages without a browser).
import { readFile } from 'node:fs/promises';
import path from 'node:path';

import * as ort from 'onnxruntime-node';

import { loadGenerator } from './generator.mjs';

export { Generator } from './generator.mjs';
export { GENERATION_OPTIONS } from './sampling.mjs';
export { byteText } from './text.mjs';

/** The generator of a `causal-lm-with-past` folder; sessionOptions: onnxruntime-node's (default: CPU). */
export function load(folder, sessionOptions = {}) {
  return loadGenerator(ort, folderSource(folder), sessionOptions);
}

/** As load, on onnxruntime-web's WebAssembly backend (one thread), the model files read into memory. */
export async function loadOnWasm(folder, sessionOptions = {}) {
  const ortWeb = await import('onnxruntime-web');
  ortWeb.env.wasm.numThreads = 1;
  const source = { ...folderSource(folder), model: (file) => readFile(path.join(folder, file)) };
  return loadGenerator(ortWeb, source, { executionProviders: ['wasm'], ...sessionOptions });
}

/** A folder on disk as loadGenerator's source. */
export function folderSource(folder) {
  return {
    name: folder,
    async readText(file) {
      try {
        return await readFile(path.join(folder, file), 'utf8');
      } catch (error) {
        if (error.code === 'ENOENT') return null;
        throw new Error(`cannot read ${path.join(folder, file)}: ${error.message}`);
      }
    },
    model: (file) => path.join(folder, file),
  };
}

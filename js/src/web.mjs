// Browser entry: an exported folder (a URL) on onnxruntime-web's WebAssembly backend.
import * as ort from 'onnxruntime-web';

import { loadGenerator } from './generator.mjs';

export { Generator } from './generator.mjs';
export { GENERATION_OPTIONS } from './sampling.mjs';
export { byteText } from './text.mjs';
export { ort };

/**
 * The generator of a `causal-lm-with-past` folder served at `url` (relative URLs resolve against the page);
 * sessionOptions: onnxruntime-web's (default: the WebAssembly backend). Where the page is not cross-origin
 * isolated (a plain static server), WebAssembly runs on one thread.
 */
export function load(url, sessionOptions = {}) {
  if (!globalThis.crossOriginIsolated) ort.env.wasm.numThreads = 1;
  return loadGenerator(ort, urlSource(url), { executionProviders: ['wasm'], ...sessionOptions });
}

/** A folder served over HTTP as loadGenerator's source (a 404 is a missing file). */
export function urlSource(url) {
  const base = new URL(url.endsWith('/') ? url : `${url}/`, globalThis.location?.href);
  return {
    name: base.href,
    async readText(file) {
      const response = await fetch(new URL(file, base));
      if (response.status === 404) return null;
      if (!response.ok) throw new Error(`cannot fetch ${new URL(file, base).href}: HTTP ${response.status}`);
      return response.text();
    },
    model: (file) => new URL(file, base).href,
  };
}

// Generation over the prefill and decoder-step graphs of a `reformer-export --task causal-lm-with-past`
// folder, through the onnxruntime-common API that onnxruntime-node and onnxruntime-web both implement. The loop
// is reformer/sampling.py's generation_steps: prefill each group of equal prompt length alone, align the
// groups' caches (cache.mjs), then one step graph run per new token for the whole batch.
import { leftPadCaches } from './cache.mjs';
import { Prompts, TokenChooser, checkGenerationLength } from './sampling.mjs';
import { TOKENIZER_CONFIG_NAME, TOKENIZER_NAME, TextStream, textFor } from './text.mjs';

export const DECODER_CONFIG_NAME = 'decoder_config.json';

/**
 * ort: onnxruntime-node or onnxruntime-web (their InferenceSession and Tensor); source: the folder, as
 * { name (for messages), readText(file) -> Promise<string | null> (null: no such file),
 *   model(file) -> what ort.InferenceSession.create takes (a path, a URL, bytes) };
 * sessionOptions: ONNX Runtime's session options (e.g. { executionProviders: ['cpu'] }).
 */
export async function loadGenerator(ort, source, sessionOptions = {}) {
  const description = await readJson(source, DECODER_CONFIG_NAME);
  if (description === null) {
    throw new Error(`no ${DECODER_CONFIG_NAME} in ${source.name}: export with --task causal-lm-with-past`);
  }
  if (description.format !== 'onnx') throw new Error(`${source.name} holds a ${description.format} export, not ONNX`);
  if (!('max_length' in description)) {
    throw new Error(`${source.name} was exported by an older version (no max_length in ${DECODER_CONFIG_NAME}): export it again`);
  }
  const sessions = {};
  for (const [kind, file] of Object.entries(description.files)) {
    sessions[kind] = await ort.InferenceSession.create(await source.model(file), sessionOptions);
  }
  const tokenizerJson = await readJson(source, TOKENIZER_NAME);
  const tokenizerConfig = tokenizerJson && await readJson(source, TOKENIZER_CONFIG_NAME);
  return new Generator(ort, description, sessions, textFor(description.vocab_size, tokenizerJson, tokenizerConfig),
    source.name);
}

async function readJson(source, file) {
  const content = await source.readText(file);
  if (content === null) return null;
  try {
    return JSON.parse(content);
  } catch (error) {
    throw new Error(`${file} in ${source.name} is not JSON: ${error.message}`);
  }
}

export class Generator {
  constructor(ort, description, sessions, text, name) {
    this.ort = ort;
    this.description = description;
    this.sessions = sessions;
    // { kind, encode(text) -> ids, decode(ids) -> text } or null: the model takes and gives ids only.
    this.text = text;
    this.name = name;
    this.cacheTensors = description.cache.map((cacheName) => [cacheName, description.cache_tensors[cacheName]]);
  }

  get vocabSize() { return this.description.vocab_size; }

  get maxLength() { return this.description.max_length; }

  get eosTokenId() { return this.description.eos_token_id; }

  get padTokenId() { return this.description.pad_token_id; }

  /** Token-id lists from prompts: a string or a list of ids (one prompt), or a list of strings and id lists. */
  promptIds(prompts) {
    const single = typeof prompts === 'string' || (Array.isArray(prompts) && typeof prompts[0] === 'number');
    return (single ? [prompts] : prompts).map((prompt) => (typeof prompt === 'string' ? this.encode(prompt) : prompt));
  }

  encode(text) {
    if (this.text === null) {
      throw new Error(`${this.name} has no tokenizer (vocabulary ${this.vocabSize}, no ${TOKENIZER_NAME}): give token ids, not text`);
    }
    return this.text.encode(text);
  }

  /**
   * The new tokens of every row: { promptIds, ids (each row's new tokens), texts (each row's new text, or null
   * without a tokenizer) }. prompts: see promptIds (rows of different lengths: each generates what it would
   * alone); options: maxNewTokens and those of sampling.mjs's GENERATION_OPTIONS.
   */
  async generate(prompts, options) {
    const ids = [];
    let promptIds = null;
    for await (const step of this.stream(prompts, options)) {
      promptIds ??= step.promptIds;
      step.tokens.forEach((token, row) => { (ids[row] ??= []).push(token); });
    }
    return { promptIds, ids, texts: this.text && ids.map((row) => this.text.decode(row)) };
  }

  /**
   * The steps as they come, an async iterator of { promptIds, tokens (one per row), logits (Float32Array B x V:
   * the logits the tokens were chosen from), texts (the text each row gained, or null) }; the last step's texts
   * include any bytes held back for an unfinished character. Arguments as for generate, checked at once;
   * leaving the loop stops generation.
   */
  stream(prompts, options = {}) {
    const { maxNewTokens, ...choice } = options;
    const batch = new Prompts(this.promptIds(prompts));
    const chooser = new TokenChooser(choice, this.padTokenId);
    checkGenerationLength(this.maxLength, "the export's max_length", batch.width, maxNewTokens);
    batch.checkVocabulary(this.vocabSize);
    chooser.start(batch, this.vocabSize);
    return this.steps(batch, chooser, maxNewTokens);
  }

  async* steps(batch, chooser, maxNewTokens) {
    const textStream = this.text && new TextStream(this.text, batch.batchSize);
    let { logits, cache } = await this.prefill(batch);
    for (let step = 0; ; step += 1) {
      const tokens = chooser.choose(logits);
      const last = step === maxNewTokens - 1 || chooser.allFinished;
      let texts = textStream && textStream.add(tokens);
      if (last && texts) texts = textStream.flush().map((rest, row) => texts[row] + rest);
      yield { promptIds: batch.rows, tokens, logits, texts };
      if (last) return;
      ({ logits, cache } = await this.run('step', tokens.map((token) => [token]), cache));
    }
  }

  /** Every row's logits at its last prompt token and the batch's cache, from one prefill per prompt length. */
  async prefill(batch) {
    const logits = new Float32Array(batch.batchSize * this.vocabSize);
    const groups = [];
    for (const [, rows] of batch.lengthGroups()) {
      const group = await this.run('prefill', rows.map((row) => batch.rows[row]), []);
      rows.forEach((row, index) => {
        logits.set(group.logits.subarray(index * this.vocabSize, (index + 1) * this.vocabSize), row * this.vocabSize);
      });
      groups.push([rows, group.cache]);
    }
    return { logits, cache: leftPadCaches(this.ort, batch, groups, this.cacheTensors) };
  }

  /** One graph over ids (rows of equal length) and a cache: { logits at the last position, B x V; cache }. */
  async run(kind, rows, past) {
    const { inputs, outputs } = this.description[kind];
    const ids = new this.ort.Tensor('int64', BigInt64Array.from(rows.flat(), BigInt), [rows.length, rows[0].length]);
    const feeds = Object.fromEntries(inputs.map((name, index) => [name, index === 0 ? ids : past[index - 1]]));
    const results = await this.sessions[kind].run(feeds);
    const [batchSize, length, vocabSize] = results[outputs[0]].dims;
    const all = results[outputs[0]].data;
    const logits = new Float32Array(batchSize * vocabSize);
    for (let row = 0; row < batchSize; row += 1) {
      const start = (row * length + length - 1) * vocabSize;
      logits.set(all.subarray(start, start + vocabSize), row * vocabSize);
    }
    return { logits, cache: outputs.slice(1).map((name) => results[name]) };
  }

  /** Close the sessions (onnxruntime-web frees their WebAssembly memory). */
  async release() {
    await Promise.all(Object.values(this.sessions).map((session) => session.release()));
  }
}

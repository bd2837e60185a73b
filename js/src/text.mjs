// Text in and out of token ids: the byte vocabulary of reformer/tokenizer.py (vocabulary 258: id = byte + 2, 0
// padding, 1 end of document) or a `tokenizer.json` in the export's folder (through @huggingface/tokenizers).
import { Tokenizer } from '@huggingface/tokenizers';

export const TOKENIZER_NAME = 'tokenizer.json';
export const TOKENIZER_CONFIG_NAME = 'tokenizer_config.json';
const BYTE_OFFSET = 2;
export const BYTE_VOCAB_SIZE = 256 + BYTE_OFFSET;

/** One token per UTF-8 byte, shifted past the two special ids; special ids decode to nothing. */
export const byteText = {
  kind: 'bytes',
  encode(text) {
    return [...new TextEncoder().encode(text)].map((byte) => byte + BYTE_OFFSET);
  },
  /** Bytes that are not valid UTF-8 (a generation may cut a character in two) become U+FFFD. */
  decode(ids) {
    const outside = ids.find((token) => !(token >= 0 && token < BYTE_VOCAB_SIZE));
    if (outside !== undefined) {
      throw new Error(`token id ${outside} is outside the byte vocabulary 0..${BYTE_VOCAB_SIZE - 1}`);
    }
    const bytes = Uint8Array.from(ids.filter((token) => token >= BYTE_OFFSET), (token) => token - BYTE_OFFSET);
    return new TextDecoder('utf-8').decode(bytes);
  },
};

/** A `tokenizer.json` (and its optional tokenizer_config.json) as a codec; decoding skips special tokens. */
export function tokenizerText(tokenizerJson, tokenizerConfig) {
  const tokenizer = new Tokenizer(tokenizerJson, tokenizerConfig ?? {});
  return {
    kind: TOKENIZER_NAME,
    encode: (text) => tokenizer.encode(text).ids,
    decode: (ids) => tokenizer.decode(ids, { skip_special_tokens: true }),
  };
}

/** The codec for a model: its tokenizer.json where the folder has one, else bytes for a vocabulary of 258,
 * else null (ids only). */
export function textFor(vocabSize, tokenizerJson, tokenizerConfig) {
  if (tokenizerJson) return tokenizerText(tokenizerJson, tokenizerConfig);
  return vocabSize === BYTE_VOCAB_SIZE ? byteText : null;
}

/**
 * Each row's new text as tokens arrive: `add(tokens)` takes one token per row and returns the text each row
 * gained. The row's whole generation is decoded each time (a token's text can depend on its neighbours), and
 * a trailing U+FFFD waits for the bytes that may complete its character; `flush()` returns what waited.
 */
export class TextStream {
  constructor(text, batchSize) {
    this.text = text;
    this.tokens = Array.from({ length: batchSize }, () => []);
    this.emittedLengths = new Array(batchSize).fill(0);
  }

  add(tokens) {
    return tokens.map((token, row) => {
      this.tokens[row].push(token);
      return this.advance(row, false);
    });
  }

  flush() {
    return this.tokens.map((_, row) => this.advance(row, true));
  }

  advance(row, final) {
    let decoded = this.text.decode(this.tokens[row]);
    if (!final) decoded = decoded.replace(/\uFFFD+$/u, '');
    // A decoder that rewrites earlier text (rare) cannot take back what was emitted: what follows is cut by length.
    const emittedLength = this.emittedLengths[row];
    if (decoded.length <= emittedLength) return '';
    this.emittedLengths[row] = decoded.length;
    return decoded.slice(emittedLength);
  }
}

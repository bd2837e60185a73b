// One cache for a batch from the caches of its groups of equal prompt length, as reformer/sampling.py's
// left_pad_caches builds it: Reformer's chunked attention depends on where a position sits in its own row, so
// each group is prefilled alone; then every tensor with an axis of positions gets `padding_value` in front of
// each group's positions up to the longest prompt, the `left_padding` tensor counts that padding, and rows go
// back to the prompts' order. Every row then decodes exactly as it would alone.

// The cache tensor holding, per row, the number of padding positions in front of its first token.
export const LEFT_PADDING = 'left_padding';
// The name of the cache tensors' axis of positions in decoder_config.json's shapes.
export const PAST_LENGTH = 'past_length';

/**
 * ort: an onnxruntime-common style module (its Tensor class); prompts: the batch (sampling.mjs Prompts);
 * groups: [[rows, cache tensors]] per prompt length; cacheTensors: decoder_config.json's `cache_tensors` in
 * cache order (an array of [name, description]).
 */
export function leftPadCaches(ort, prompts, groups, cacheTensors) {
  if (groups.length === 1) return groups[0][1];
  const place = new Array(prompts.batchSize); // row -> [group's cache, index of the row in its group, padding]
  for (const [rows, cache] of groups) {
    rows.forEach((row, index) => { place[row] = [cache, index, prompts.width - prompts.lengths[row]]; });
  }
  return cacheTensors.map(([name, description], tensorIndex) => {
    const axis = description.shape.indexOf(PAST_LENGTH);
    const first = place[0][0][tensorIndex];
    const dims = [prompts.batchSize, ...first.dims.slice(1)];
    if (axis > 0) dims[axis] = prompts.width;
    const rowSize = dims.slice(1).reduce((a, b) => a * b, 1);
    const data = new first.data.constructor(prompts.batchSize * rowSize);
    place.forEach(([cache, index, padding], row) => {
      const tensor = cache[tensorIndex];
      const sourceSize = tensor.data.length / tensor.dims[0];
      const source = tensor.data.subarray(index * sourceSize, (index + 1) * sourceSize);
      const target = data.subarray(row * rowSize, (row + 1) * rowSize);
      if (name === LEFT_PADDING) {
        target[0] = source[0] + BigInt(padding);
      } else if (axis > 0) {
        padInFront(source, tensor.dims.slice(1), axis - 1, padding, description.padding_value, target);
      } else {
        target.set(source);
      }
    });
    return new ort.Tensor(first.type, data, dims);
  });
}

/** One row's block of shape `shape` into `target`, with `padding` entries of `value` in front along `axis`. */
function padInFront(source, shape, axis, padding, value, target) {
  const outer = shape.slice(0, axis).reduce((a, b) => a * b, 1);
  const inner = shape.slice(axis + 1).reduce((a, b) => a * b, 1);
  const sourceBlock = shape[axis] * inner;
  const targetBlock = sourceBlock + padding * inner;
  const fill = source instanceof BigInt64Array ? BigInt(value) : value;
  for (let index = 0; index < outer; index += 1) {
    const start = index * targetBlock;
    target.fill(fill, start, start + padding * inner);
    target.set(source.subarray(index * sourceBlock, (index + 1) * sourceBlock), start + padding * inner);
  }
}

// The page: load a folder by URL (the form, or ?model=URL), then stream each prompt's new text into its row.
import { load } from '../src/web.mjs';

const $ = (id) => document.getElementById(id);
let generator = null;
let stopRequested = false;

function setState(state) {
  document.body.dataset.state = state;
  $('generate').disabled = !generator || state === 'generating' || state === 'loading';
  $('stop').disabled = state !== 'generating';
  $('load').disabled = state === 'generating' || state === 'loading';
}

function showError(error) {
  $('error').textContent = String(error?.message ?? error);
  setState('error');
}

async function loadModel(url) {
  $('error').textContent = '';
  $('model-status').textContent = 'loading ...';
  setState('loading');
  const started = performance.now();
  await generator?.release();
  generator = null;
  try {
    generator = await load(url);
  } catch (error) {
    $('model-status').textContent = '';
    showError(error);
    return;
  }
  const seconds = ((performance.now() - started) / 1000).toFixed(1);
  const text = generator.text ? `text: ${generator.text.kind}` : 'token ids only (one comma-separated list per line)';
  $('model-status').textContent = `vocabulary ${generator.vocabSize}, max length ${generator.maxLength}, ${text}; `
    + `loaded in ${seconds} s`;
  setState('ready');
}

function number(id) {
  const value = $(id).value.trim();
  return value === '' ? undefined : Number(value);
}

function options() {
  const sample = $('decoding').value === 'sample';
  return {
    maxNewTokens: number('max-new-tokens'),
    doSample: sample,
    temperature: sample ? number('temperature') : undefined,
    topK: sample ? number('top-k') : undefined,
    topP: sample ? number('top-p') : undefined,
    seed: sample ? number('seed') : undefined,
    repetitionPenalty: number('repetition-penalty'),
    eosTokenId: $('stop-at-eos').checked ? generator.eosTokenId : undefined,
  };
}

/** Each line a prompt: text for a model with a tokenizer, else comma-separated token ids. */
function prompts() {
  const lines = $('prompts').value.split('\n').filter((line) => line.trim() !== '');
  if (lines.length === 0) throw new Error('write a prompt');
  return generator.text ? lines : lines.map((line) => line.split(',').map(Number));
}

function rowElements(count, promptTexts) {
  $('rows').replaceChildren();
  return Array.from({ length: count }, (_, row) => {
    const pre = document.createElement('pre');
    const prompt = document.createElement('span');
    prompt.className = 'prompt';
    prompt.textContent = promptTexts[row];
    const generated = document.createElement('span');
    generated.className = 'generated';
    pre.append(prompt, generated);
    $('rows').append(pre);
    return generated;
  });
}

async function generate() {
  $('error').textContent = '';
  const steps = generator.stream(prompts(), options()); // checks the arguments before anything changes
  setState('generating');
  stopRequested = false;
  const started = performance.now();
  let outputs = null;
  let ids = null;
  for await (const step of steps) {
    outputs ??= rowElements(step.promptIds.length,
      step.promptIds.map((row) => (generator.text ? generator.text.decode(row) : `${row.join(',')} →`)));
    ids ??= step.promptIds.map(() => []);
    step.tokens.forEach((token, row) => {
      ids[row].push(token);
      outputs[row].textContent += step.texts ? step.texts[row] : ` ${token}`;
    });
    const seconds = (performance.now() - started) / 1000;
    $('generation-status').textContent = `${ids[0].length} steps in ${seconds.toFixed(2)} s `
      + `(${(ids[0].length / seconds).toFixed(1)} steps/s, ${ids.length} rows)`;
    if (stopRequested) break;
  }
  const texts = generator.text && ids.map((row) => generator.text.decode(row));
  $('result').textContent = JSON.stringify({ ids, texts });
  setState('done');
}

function syncSamplingControls() {
  const greedy = $('decoding').value === 'greedy';
  for (const id of ['temperature', 'top-k', 'top-p', 'seed']) $(id).disabled = greedy;
}

$('model-form').addEventListener('submit', (event) => {
  event.preventDefault();
  loadModel($('model').value.trim());
});
$('generate-form').addEventListener('submit', (event) => {
  event.preventDefault();
  generate().catch(showError);
});
$('stop').addEventListener('click', () => { stopRequested = true; });
$('decoding').addEventListener('change', syncSamplingControls);
syncSamplingControls();
setState('idle');

const requested = new URLSearchParams(location.search).get('model');
if (requested) {
  $('model').value = requested;
  loadModel(requested);
}

#!/usr/bin/env node
// Drive js/web/ in a headless Chromium (tests/js/test_javascript.py runs this): open the page with a model,
// generate greedily from the prompts, save a screenshot, and print {"ids", "texts", "updates"} as JSON, where
// updates counts the changes to the rows' text while generating (the stream shows steps as they come).
//   node drive-page.mjs --url URL --chromium PATH --screenshot PNG --prompt TEXT... [--max-new-tokens N]
//     [--decoding greedy|sample] [--seed S] [--repetition-penalty R]
import { parseArgs } from 'node:util';

import { chromium } from 'playwright-core';

const TIMEOUT_MS = Number(process.env.DRIVE_PAGE_TIMEOUT_MS ?? 60_000);

const { values } = parseArgs({
  options: {
    url: { type: 'string' },
    chromium: { type: 'string' },
    screenshot: { type: 'string' },
    prompt: { type: 'string', multiple: true },
    'max-new-tokens': { type: 'string', default: '24' },
    decoding: { type: 'string', default: 'greedy' },
    seed: { type: 'string', default: '' },
    'repetition-penalty': { type: 'string', default: '1' },
  },
});

async function settled(page) {
  await page.waitForSelector('body[data-state="ready"], body[data-state="done"], body[data-state="error"]',
    { timeout: TIMEOUT_MS, state: 'attached' });
  const error = await page.textContent('#error');
  if (error) throw new Error(`the page says: ${error}`);
}

async function main() {
  // --no-sandbox: Chromium's sandbox refuses to start as root (CI containers).
  const browser = await chromium.launch({ executablePath: values.chromium, headless: true, args: ['--no-sandbox'] });
  try {
    const page = await browser.newPage({ viewport: { width: 1100, height: 760 } });
    page.on('pageerror', (error) => console.error(`page error: ${error.message}`));
    page.on('console', (message) => console.error(`page console: ${message.text()}`));
    await page.goto(values.url);
    await settled(page);
    await page.fill('#prompts', values.prompt.join('\n'));
    await page.fill('#max-new-tokens', values['max-new-tokens']);
    await page.selectOption('#decoding', values.decoding);
    await page.fill('#repetition-penalty', values['repetition-penalty']);
    if (values.decoding === 'sample') await page.fill('#seed', values.seed);
    await page.evaluate(() => {
      window.rowUpdates = 0;
      new MutationObserver(() => { window.rowUpdates += 1; })
        .observe(document.getElementById('rows'), { subtree: true, childList: true, characterData: true });
    });
    await page.click('#generate');
    await page.waitForSelector('body[data-state="done"], body[data-state="error"]', { timeout: TIMEOUT_MS, state: 'attached' });
    await settled(page);
    await page.screenshot({ path: values.screenshot, fullPage: true });
    const result = JSON.parse(await page.textContent('#result'));
    console.log(JSON.stringify({ ...result, updates: await page.evaluate(() => window.rowUpdates) }));
  } finally {
    await browser.close();
  }
}

main().catch((error) => {
  console.error(`drive-page.mjs: error: ${String(error?.message ?? error).split('\n')[0]}`);
  process.exit(2);
});

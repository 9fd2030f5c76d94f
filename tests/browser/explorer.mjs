#!/usr/bin/env node
// The API explorer (/api/docs, Swagger UI) in a real (headless) browser.
//
//   node tests/browser/explorer.mjs <base_url> <screenshot_path> <read_token>
//
// Expects an engine at <base_url> started with --read-tokens <read_token>. Checks that the
// explorer loads without a token and from the engine alone (no request leaves it), shows the
// document, takes a bearer token from its Authorize button, and sends it: "Try it out" on
// GET /api/devices answers 200 with the token (the engine answers 401 without one).
// Exit code 0 = pass; on failure a screenshot is written next to <screenshot_path>.

import fs from 'node:fs';
import path from 'node:path';
import { args, assert, fail, launchChromium, reportFailure, run, step } from './lib.mjs';

const ARGS = args('base_url', 'screenshot_path', 'read_token');
const { read_token: READ_TOKEN } = ARGS;
const BASE = ARGS.base_url;
const SHOT = ARGS.screenshot_path;
const WAIT_MS = 15_000;
const OVERALL_TIMEOUT_MS = 120_000;


async function main() {
  fs.mkdirSync(path.dirname(SHOT), { recursive: true });
  step('the engine needs a read token');
  const refused = await fetch(`${BASE}/api/devices`);
  assert(refused.status === 401, `GET /api/devices without a token answered ${refused.status}`);

  const browser = await launchChromium();
  const problems = [];
  const urls = [];
  const devicesRequests = [];
  let page;
  try {
    const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
    page = await context.newPage();
    page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
    page.on('console', (m) => { if (m.type() === 'error') problems.push(`console error: ${m.text()}`); });
    page.on('request', (req) => {
      urls.push(req.url());
      if (new URL(req.url()).pathname === '/api/devices') devicesRequests.push(req);
    });
    try {
      step('the explorer loads without a token and shows the document');
      const response = await page.goto(`${BASE}/api/docs`, { waitUntil: 'load' });
      assert(response && response.status() === 200, `GET /api/docs answered ${response && response.status()}`);
      await page.waitForSelector('.swagger-ui .info .title', { timeout: WAIT_MS });
      const title = await page.textContent('.swagger-ui .info .title');
      assert(/fleetwatch/.test(title), `title: ${title}`);
      await page.waitForSelector('#operations-devices-list_devices', { timeout: WAIT_MS });

      step('Authorize takes the bearer token');
      await page.click('.swagger-ui .auth-wrapper .btn.authorize');
      await page.waitForSelector('.modal-ux input', { timeout: WAIT_MS });
      await page.fill('.modal-ux input', READ_TOKEN);
      await page.click('.modal-ux .auth-btn-wrapper .btn.authorize');
      await page.click('.modal-ux .btn-done');

      step('"Try it out" on GET /api/devices sends it and gets 200');
      await page.click('#operations-devices-list_devices .opblock-summary');
      await page.click('#operations-devices-list_devices .try-out__btn', { timeout: WAIT_MS });
      await page.click('#operations-devices-list_devices .btn.execute', { timeout: WAIT_MS });
      const status = page.locator('#operations-devices-list_devices .live-responses-table tbody .response-col_status').first();
      await status.waitFor({ timeout: WAIT_MS });
      const shown = (await status.textContent()).trim();
      assert(shown.startsWith('200'), `the explorer showed status ${shown}`);
      assert(devicesRequests.length === 1, `requests to /api/devices: ${devicesRequests.length}`);
      const auth = await devicesRequests[0].headerValue('authorization');
      assert(auth === `Bearer ${READ_TOKEN}`, `Authorization sent: ${auth}`);

      step('nothing was loaded from outside the engine');
      const foreign = urls.filter((u) => !u.startsWith(BASE) && !u.startsWith('data:'));
      assert(foreign.length === 0, `requests outside the engine: ${foreign.join(', ')}`);
      assert(!urls.some((u) => u.includes(READ_TOKEN)), 'the token went into a URL');

      await page.screenshot({ path: SHOT, fullPage: false });
      assert(problems.length === 0, `the page reported problems:\n  ${problems.join('\n  ')}`);
    } catch (e) {
      await reportFailure(page, SHOT, problems);
      throw e;
    }
  } finally {
    await browser.close();
  }
}

run(main, OVERALL_TIMEOUT_MS);

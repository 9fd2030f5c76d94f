#!/usr/bin/env node
// The map page against an engine that needs tokens, in a real (headless) browser.
//
//   node tests/browser/auth.mjs <base_url> <screenshot_path> <read_token> <admin_token>
//
// Expects an engine at <base_url> with an empty data dir, started with --read-tokens <read_token>
// and --admin-tokens <admin_token> (ingest open). Checks that the page asks for a token before it
// shows anything, asks again after a wrong one, shows devices and live events once given the read
// token, asks for a better token when saving a range needs admin, keeps the token for the session
// (a reload does not ask), and never puts a token in a URL (the stream uses a ticket).
// Exit code 0 = pass; on failure a screenshot is written next to <screenshot_path>.

import fs from 'node:fs';
import path from 'node:path';
import { args, assert, fail, launchChromium, poller, reportFailure, run, step } from './lib.mjs';

const ARGS = args('base_url', 'screenshot_path', 'read_token', 'admin_token');
const { read_token: READ_TOKEN, admin_token: ADMIN_TOKEN } = ARGS;
const BASE = ARGS.base_url;
const SHOT = ARGS.screenshot_path;
const WAIT_MS = 10_000;
const OVERALL_TIMEOUT_MS = 120_000;
const DEVICE = 'auth-truck';
const ZONE_ID = 'auth-zone';
const RANGE_NAME = 'Auth cold chain';
const T0 = Date.now();
let readingNo = 0;


async function api(method, p, body, token) {
  const headers = { Accept: 'application/json' };
  if (token) headers.Authorization = `Bearer ${token}`;
  const init = { method, headers };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const res = await fetch(BASE + p, init);
  const text = await res.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch (_) { /* not JSON */ }
  return { status: res.status, json, text };
}

async function expectStatus(method, p, body, token, status) {
  const r = await api(method, p, body, token);
  assert(r.status === status, `${method} ${p} answered ${r.status} (expected ${status}): ${r.text}`);
  return r.json;
}

async function postReading(lat, lon, temperature) {
  readingNo += 1;
  const timestamp = new Date(T0 + readingNo * 1000).toISOString();
  await expectStatus('POST', '/api/readings', { device_id: DEVICE, timestamp, lat, lon, temperature }, undefined, 202);
}

const poll = poller(WAIT_MS);

const markerAt = (page, lat, lon) => page.evaluate(([id, la, lo]) => {
  const m = window.fleetwatch && window.fleetwatch.markers.get(id);
  if (!m) return false;
  const ll = m.getLatLng();
  return Math.abs(ll.lat - la) < 1e-6 && Math.abs(ll.lng - lo) < 1e-6;
}, [DEVICE, lat, lon]);

const promptShown = (page) => page.evaluate(() => !document.querySelector('#auth-panel').hidden);

async function enterToken(page, token) {
  await page.fill('#auth-token', token);
  await page.click('#auth-submit');
}

async function main() {
  fs.mkdirSync(path.dirname(SHOT), { recursive: true });

  step('the engine says reads and configuration need tokens');
  const config = await expectStatus('GET', '/api/config', undefined, undefined, 200);
  assert(config.auth && config.auth.read && config.auth.admin && !config.auth.ingest, `GET /api/config: ${JSON.stringify(config)}`);
  await expectStatus('GET', '/api/devices', undefined, undefined, 401);

  step('a zone (admin token) and a first reading inside it');
  await expectStatus('POST', '/api/zones', {
    id: ZONE_ID, name: 'Auth zone', devices: [DEVICE],
    shape: { type: 'circle', center: { lat: 52.37, lon: 4.89 }, radius_m: 2000 },
  }, ADMIN_TOKEN, 201);
  const p1 = { lat: 52.372, lon: 4.893 };
  await postReading(p1.lat, p1.lon, 4.0);

  const browser = await launchChromium();
  const problems = [];
  const refusals = [];
  const urls = [];
  let page;
  try {
    const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
    page = await context.newPage();
    page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
    page.on('console', (m) => {
      // Chromium logs every refused request; those are checked below.
      if (m.type() === 'error' && !/status of 40[13]/.test(m.text())) problems.push(`console error: ${m.text()}`);
    });
    page.on('request', (req) => urls.push(req.url()));
    page.on('response', (res) => {
      if (res.status() === 401 || res.status() === 403) {
        refusals.push(`${res.status()} ${res.request().method()} ${new URL(res.url()).pathname}`);
      } else if (res.status() >= 400) {
        problems.push(`HTTP ${res.status()} for ${res.url()}`);
      }
    });

    try {
      step('1. the page asks for a token and shows nothing yet');
      await page.goto(`${BASE}/`, { waitUntil: 'load' });
      await poll('the token prompt', () => promptShown(page));
      const message = await page.textContent('#auth-message');
      assert(/token/i.test(message), `prompt message: "${message}"`);
      assert(await page.evaluate(() => window.fleetwatch.markers.size === 0), 'markers shown before a token was given');
      const conn = (await page.textContent('#connection-state')).trim();
      assert(conn !== 'connected', 'the stream is connected without a token');

      step('2. a wrong token is refused and the page asks again');
      await enterToken(page, 'not-the-token');
      await poll('the prompt again, saying the token is unknown', async () => (await promptShown(page))
        && /unknown token/.test(await page.textContent('#auth-message')));
      assert(await page.evaluate(() => window.fleetwatch.markers.size === 0), 'markers shown after a wrong token');

      step('3. the read token shows the device and connects the stream');
      await enterToken(page, READ_TOKEN);
      await page.waitForFunction(
        () => document.querySelector('#connection-state')?.textContent.trim() === 'connected',
        null, { timeout: WAIT_MS },
      ).catch(() => fail('#connection-state never read "connected"'));
      await poll(`the marker of ${DEVICE}`, () => markerAt(page, p1.lat, p1.lon));
      await poll(`zone ${ZONE_ID} drawn`, () => page.evaluate((id) => window.fleetwatch.zones.has(id), ZONE_ID));
      assert(!(await promptShown(page)), 'the prompt is still shown');
      const stored = await page.evaluate(() => sessionStorage.getItem('fleetwatch.token'));
      assert(stored === READ_TOKEN, `sessionStorage holds ${stored}`);

      step('4. live events arrive: a reading far outside raises an alarm on the page');
      const p2 = { lat: 52.09, lon: 5.12 };
      await postReading(p2.lat, p2.lon, 4.2);
      await poll('the marker to move', () => markerAt(page, p2.lat, p2.lon));
      await poll('a LeftZone entry in the alarm feed', async () => {
        const texts = await page.$$eval(`#alarm-feed .alarm-entry[data-device="${DEVICE}"]`, (els) => els.map((e) => e.textContent));
        return texts.find((t) => /left/i.test(t)) || null;
      });

      step('4b. acknowledging the alarm needs admin: the page asks, and shows the 403 when refused');
      const alarmSel = `#alarm-list li.alarm-item[data-device="${DEVICE}"]`;
      const alarmId = await poll('the open alarm listed', () => page.evaluate((sel) => {
        const li = document.querySelector(sel);
        return li && li.dataset.state === 'open' && li.querySelector('button[data-action="ack"]') ? li.dataset.alarm : null;
      }, alarmSel));
      await page.click(`${alarmSel} button[data-action="ack"]`);
      await poll('the prompt asking for more rights to acknowledge', async () => (await promptShown(page))
        && /more rights/.test(await page.textContent('#auth-message')));
      await page.click('#auth-cancel');
      const refused = await poll('the refusal shown at the alarm', () => page.evaluate((sel) => {
        const e = document.querySelector(`${sel} .alarm-error`);
        return e && /HTTP 403/.test(e.textContent) ? e.textContent : null;
      }, alarmSel));
      assert(await page.evaluate((sel) => document.querySelector(sel).dataset.state === 'open', alarmSel), 'the refused alarm is not shown open');
      console.log(`[auth.mjs]    ${alarmId}: "${refused}"`);

      step('5. saving a range needs admin: the page asks for a better token');
      await page.fill('#range-name', RANGE_NAME);
      await page.fill('#range-min', '2');
      await page.fill('#range-max', '8');
      await page.click('#range-save');
      await poll('the prompt asking for more rights', async () => (await promptShown(page))
        && /more rights/.test(await page.textContent('#auth-message')));
      await enterToken(page, ADMIN_TOKEN);
      const range = await poll(`the range "${RANGE_NAME}" stored`, async () => {
        const r = await api('GET', '/api/temperature-ranges', undefined, ADMIN_TOKEN);
        return r.status === 200 ? r.json.find((x) => x.name === RANGE_NAME) : null;
      });
      assert(range.min === 2 && range.max === 8, `range saved as ${JSON.stringify(range)}`);
      await poll('the range listed in the sidebar', async () => (await page.textContent('#range-list')).includes(RANGE_NAME));

      step('5b. with the admin token, Acknowledge works');
      await page.click(`${alarmSel} button[data-action="ack"]`);
      await poll('the alarm shown acknowledged', () => page.evaluate((sel) => document.querySelector(sel)?.dataset.state === 'acknowledged', alarmSel));
      const acked = await poll('GET /api/alarms to say acknowledged', async () => {
        const r = await api('GET', '/api/alarms?state=acknowledged', undefined, READ_TOKEN);
        return r.status === 200 ? r.json.alarms.find((a) => a.id === alarmId) : null;
      });
      assert(acked.acknowledged, `acknowledged alarm: ${JSON.stringify(acked)}`);

      step('6. a reload keeps the token for the session: no prompt, connected, device shown');
      await page.reload({ waitUntil: 'load' });
      await page.waitForFunction(
        () => document.querySelector('#connection-state')?.textContent.trim() === 'connected',
        null, { timeout: WAIT_MS },
      ).catch(() => fail('#connection-state never read "connected" after the reload'));
      await poll(`the marker of ${DEVICE} after the reload`, () => markerAt(page, p2.lat, p2.lon));
      assert(!(await promptShown(page)), 'the page asked again after a reload');

      step('7. the stream was opened with tickets; no token ever went into a URL');
      const streams = urls.filter((u) => new URL(u).pathname === '/api/stream');
      assert(streams.length >= 2, `stream requests: ${streams.join(', ')}`);
      assert(streams.every((u) => /[?&]ticket=[0-9a-f]{32}(&|$)/.test(u)), `stream URLs without a ticket: ${streams.join(', ')}`);
      const leaked = urls.filter((u) => u.includes(READ_TOKEN) || u.includes(ADMIN_TOKEN) || u.includes('not-the-token'));
      assert(leaked.length === 0, `tokens in URLs: ${leaked.join(', ')}`);
      assert(refusals.includes('401 POST /api/stream/tickets'), `refusals seen: ${refusals.join(', ')}`);
      assert(refusals.includes('403 POST /api/temperature-ranges'), `refusals seen: ${refusals.join(', ')}`);
      const ackRefusal = `403 POST /api/alarms/${alarmId}/ack`;
      assert(refusals.includes(ackRefusal), `refusals seen: ${refusals.join(', ')}`);
      const unexpected = refusals.filter((r) => !['401 POST /api/stream/tickets', '403 POST /api/temperature-ranges', ackRefusal].includes(r));
      assert(unexpected.length === 0, `unexpected refusals: ${unexpected.join(', ')}`);

      await page.screenshot({ path: SHOT, fullPage: true });
      assert(problems.length === 0, `the page reported problems:\n  ${problems.join('\n  ')}`);
    } catch (e) {
      await reportFailure(page, SHOT, problems);
      console.error(`[auth.mjs] refusals seen: ${refusals.join(', ')}`);
      throw e;
    }
  } finally {
    await browser.close();
  }
}

run(main, OVERALL_TIMEOUT_MS);

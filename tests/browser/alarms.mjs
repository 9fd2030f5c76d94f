#!/usr/bin/env node
// The map page's alarms in a real (headless) browser.
//
//   node tests/browser/alarms.mjs <base_url> <screenshot_path>
//
// Before the page opens, readings dated now open alarms of every severity: a device outside a
// zone (critical) and above a range (warning), another above the same range (warning), a third
// outside a range of severity info. The page must list exactly the active alarms of
// GET /api/alarms on load, newest first, in their severity colours, with the device's popup
// showing every alarm of the device; acknowledging one through its button turns it acknowledged
// (and GET /api/alarms agrees), acknowledging it again shows the API's 409; a reading that ends
// a condition makes its alarm leave the list, a new condition adds one live. Throughout, the
// header's counters equal the list and GET /api/stats.
//
// Expects an engine already running at <base_url> with an empty data dir, admin open (loopback).
// Exit code 0 = pass; a screenshot of a failure is written next to <screenshot_path>.

import path from 'node:path';
import { args, assert, fail, launchChromium, poller, reportFailure, run, step } from './lib.mjs';

const ARGS = args('base_url', 'screenshot_path');
const BASE = ARGS.base_url;
const SHOT = ARGS.screenshot_path;
const WAIT_MS = 15_000;
const OVERALL_TIMEOUT_MS = 150_000;

const ZONE = { id: 'e2e-depot', name: 'E2E Depot' };
const COLD = { id: 'e2e-cold', name: 'E2E Cold chain' };
const FROZEN = { id: 'e2e-frozen', name: 'E2E Frozen' };
const TRUCK = 'e2e-truck'; // outside the depot (critical) and too warm (warning)
const VAN = 'e2e-van'; // too warm (warning)
const FREEZER = 'e2e-freezer'; // not frozen (info)
const LATE = 'e2e-late'; // too warm only after the page opened (warning)
const INSIDE = { lat: 52.372, lon: 4.893 };
const OUTSIDE = { lat: 52.09, lon: 5.12 };
// The severity colours of app.css (--sev-*), as getComputedStyle gives them.
const COLOURS = { critical: 'rgb(220, 38, 38)', warning: 'rgb(217, 119, 6)', info: 'rgb(37, 99, 235)' };


async function api(method, p, body) {
  const init = { method, headers: { Accept: 'application/json' } };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const res = await fetch(BASE + p, init);
  const text = await res.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch (_) { /* not JSON */ }
  return { status: res.status, json, text };
}

async function expectStatus(method, p, body, ...statuses) {
  const r = await api(method, p, body);
  assert(statuses.includes(r.status), `${method} ${p} answered ${r.status} (expected ${statuses.join('/')}): ${r.text}`);
  return r.json;
}

/** One reading dated now (a little apart per call, so the alarms' opened_at differ). */
let lastTs = 0;
async function postReading(device, where, temperature) {
  const ts = Math.max(Date.now(), lastTs + 1000);
  lastTs = ts;
  const r = await expectStatus('POST', '/api/readings',
    { device_id: device, timestamp: new Date(ts).toISOString(), lat: where.lat, lon: where.lon, temperature }, 202);
  assert(r && r.accepted === 1, `reading of ${device} was not accepted: ${JSON.stringify(r)}`);
}

const poll = poller(WAIT_MS);

/** Every alarm of GET /api/alarms?state=<state>, newest first. */
async function alarmsOf(state) {
  const out = [];
  let after = null;
  for (;;) {
    const q = new URLSearchParams({ state, limit: '1000' });
    if (after) q.set('after', after);
    const page = await expectStatus('GET', `/api/alarms?${q}`, undefined, 200);
    out.push(...page.alarms);
    if (!page.next_after) return out;
    after = page.next_after;
  }
}

/** What the page's alarm list and header show. */
const shown = (page) => page.evaluate(() => ({
  items: [...document.querySelectorAll('#alarm-list li.alarm-item')].map((li) => ({
    id: li.dataset.alarm,
    device: li.dataset.device,
    severity: li.dataset.severity,
    state: li.dataset.state,
    kind: li.dataset.kind,
    text: li.textContent.replace(/\s+/g, ' ').trim(),
    colour: getComputedStyle(li.querySelector('.alarm-sev')).backgroundColor,
    border: getComputedStyle(li).borderLeftColor,
    button: !!li.querySelector('button[data-action="ack"]'),
    error: li.querySelector('.alarm-error') ? li.querySelector('.alarm-error').textContent : '',
  })),
  header: {
    open: document.querySelector('#stat-open').textContent,
    acknowledged: document.querySelector('#stat-acked').textContent,
    outside: document.querySelector('#stat-out').textContent,
    outOfRange: document.querySelector('#stat-temp').textContent,
    offline: document.querySelector('#stat-offline').textContent,
  },
  panel: {
    open: document.querySelector('#alarm-count').textContent,
    acknowledged: document.querySelector('#alarm-acked-count').textContent,
    outside: document.querySelector('#fleet-outside').textContent,
    outOfRange: document.querySelector('#fleet-out-of-range').textContent,
    offline: document.querySelector('#fleet-offline').textContent,
  },
  error: document.querySelector('#alarm-error').textContent,
}));

/**
 * The page shows the same active alarms as GET /api/alarms (ids, states, severities, in colour),
 * newest first, and its counters agree with the list and with GET /api/stats. Polled: the API's
 * read models and the page's stream both trail the events a little.
 */
async function pageAgrees(page, what, until = () => true) {
  let last = null;
  return poll(what, async () => {
    const api = await alarmsOf('active');
    if (!until(api)) return null;
    const stats = await expectStatus('GET', '/api/stats', undefined, 200);
    // The page's statistics are refreshed every 5 s and 1.5 s after a change: ask for them now.
    await page.evaluate(() => window.fleetwatch.refreshFleet());
    const s2 = await shown(page);
    const s = s2;
    last = { page: s2, api: api.map((a) => `${a.id}:${a.state}`), stats: { alarms: stats.alarms, devices: stats.devices } };
    const byId = new Map(api.map((a) => [a.id, a]));
    if (s.items.length !== api.length || !s.items.every((i) => byId.has(i.id) && byId.get(i.id).state === i.state)) return null;
    for (const i of s2.items) {
      const a = byId.get(i.id);
      if (!a) return null;
      assert(i.severity === a.severity && i.device === a.device_id && i.kind === a.kind, `alarm ${i.id} shown as ${JSON.stringify(i)}, the API says ${JSON.stringify(a)}`);
      assert(i.colour === COLOURS[a.severity] && i.border === COLOURS[a.severity], `alarm ${i.id} (${a.severity}) is coloured ${i.colour} / ${i.border}, expected ${COLOURS[a.severity]}`);
      assert(i.button === (a.state === 'open'), `alarm ${i.id} (${a.state}) ${i.button ? 'has' : 'has no'} Acknowledge button`);
      assert(i.text.includes(a.state), `alarm ${i.id} does not say its state ${a.state}: "${i.text}"`);
    }
    // Newest first.
    const opened = s2.items.map((i) => Date.parse(byId.get(i.id).opened_at));
    assert(opened.every((t, k) => k === 0 || t <= opened[k - 1]), `the list is not newest first: ${s2.items.map((i) => `${i.id}@${byId.get(i.id).opened_at}`).join(', ')}`);
    const open = api.filter((a) => a.state === 'open').length;
    const acked = api.filter((a) => a.state === 'acknowledged').length;
    const h = s2.header;
    const p = s2.panel;
    const d = stats.devices;
    const ok = h.open === String(open) && h.acknowledged === String(acked)
      && p.open === h.open && p.acknowledged === h.acknowledged
      && stats.alarms.open === open && stats.alarms.acknowledged === acked
      && h.outside === String(d.outside_a_zone) && h.outOfRange === String(d.out_of_range) && h.offline === String(d.offline)
      && p.outside === h.outside && p.outOfRange === h.outOfRange && p.offline === h.offline;
    return ok ? { ...s2, apiAlarms: api, stats } : null;
  }).catch((e) => fail(`${e.message}; last seen ${JSON.stringify(last)}`));
}

async function main() {
  step('1. zones, ranges and readings that open alarms of every severity, before the page opens');
  await expectStatus('POST', '/api/zones', {
    id: ZONE.id, name: ZONE.name, severity: 'critical', devices: [TRUCK],
    shape: { type: 'circle', center: { lat: 52.37, lon: 4.89 }, radius_m: 2000 },
  }, 201);
  await expectStatus('POST', '/api/temperature-ranges', { id: COLD.id, name: COLD.name, min: 2, max: 8, severity: 'warning', devices: [TRUCK, VAN, LATE] }, 201);
  await expectStatus('POST', '/api/temperature-ranges', { id: FROZEN.id, name: FROZEN.name, min: -30, max: -10, severity: 'info', devices: [FREEZER] }, 201);
  await postReading(FREEZER, INSIDE, 0);
  await postReading(VAN, INSIDE, 11);
  await postReading(TRUCK, OUTSIDE, 12);
  await postReading(LATE, INSIDE, 5);
  const seeded = await poll('four active alarms in GET /api/alarms', async () => {
    const a = await alarmsOf('active');
    return a.length === 4 ? a : null;
  });
  const find = (device, kind) => seeded.find((a) => a.device_id === device && a.kind === kind);
  const truckZone = find(TRUCK, 'outside_zone');
  const truckTemp = find(TRUCK, 'temperature_out_of_range');
  const vanTemp = find(VAN, 'temperature_out_of_range');
  const freezer = find(FREEZER, 'temperature_out_of_range');
  assert(truckZone && truckTemp && vanTemp && freezer, `unexpected alarms: ${JSON.stringify(seeded)}`);
  assert(truckZone.severity === 'critical' && truckTemp.severity === 'warning' && freezer.severity === 'info',
    `severities: ${JSON.stringify(seeded.map((a) => [a.id, a.severity]))}`);
  console.log(`[alarms.mjs]    seeded: ${seeded.map((a) => `${a.id} ${a.kind} ${a.severity}`).join('; ')}`);

  step('launch chromium');
  const browser = await launchChromium();
  const problems = [];
  const expected409 = (url) => /\/api\/alarms\/[^/]+\/ack$/.test(new URL(url).pathname);
  let page;
  try {
    const context = await browser.newContext({ viewport: { width: 1440, height: 900 } });
    page = await context.newPage();
    const baseOrigin = new URL(BASE).origin;
    page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
    page.on('console', (m) => {
      if (m.type() === 'error' && !(/status of 409/.test(m.text()) && expected409(m.location().url || ''))) problems.push(`console error: ${m.text()}`);
    });
    page.on('request', (req) => {
      const u = new URL(req.url());
      if (!['data:', 'blob:', 'about:'].includes(u.protocol) && u.origin !== baseOrigin) problems.push(`request to an outside URL: ${req.url()}`);
    });
    page.on('response', (res) => {
      if (res.status() >= 400 && !(res.status() === 409 && expected409(res.url()))) problems.push(`HTTP ${res.status()} for ${res.url()}`);
    });

    try {
      step('2. on load the page lists the open alarms, newest first, in their severity colours');
      await page.goto(`${BASE}/`, { waitUntil: 'load' });
      await page.waitForFunction(() => window.fleetwatch && window.fleetwatch.alarmList, null, { timeout: WAIT_MS })
        .catch(() => fail('window.fleetwatch.alarmList never appeared'));
      await page.waitForFunction(() => document.querySelector('#connection-state')?.textContent.trim() === 'connected', null, { timeout: WAIT_MS })
        .catch(() => fail('#connection-state never read "connected"'));
      // Listed from GET /api/alarms at load (no alarm change has happened since the page opened).
      const onLoad = await poll('the first load of the alarm list', () => page.evaluate(() => (window.fleetwatch.alarmList.loads > 0
        ? [...document.querySelectorAll('#alarm-list li.alarm-item')].map((li) => li.dataset.alarm) : null)));
      assert(onLoad.length === 4 && seeded.every((a) => onLoad.includes(a.id)), `listed on load: ${onLoad.join(', ')}; the API: ${seeded.map((a) => a.id).join(', ')}`);
      const s1 = await pageAgrees(page, 'the page to list the API\'s active alarms with counters equal to GET /api/stats');
      assert(s1.items.every((i) => i.state === 'open'), `states on load: ${JSON.stringify(s1.items)}`);
      const truckItem = s1.items.find((i) => i.id === truckZone.id);
      assert(truckItem.text.includes(ZONE.name) && truckItem.text.includes(TRUCK) && /outside zone/.test(truckItem.text) && /critical/i.test(truckItem.text),
        `the truck's zone alarm reads "${truckItem.text}"`);
      assert(s1.items.find((i) => i.id === freezer.id).text.includes(FROZEN.name), 'the freezer\'s alarm does not name its range');
      assert(s1.header.open === '4' && s1.header.acknowledged === '0' && s1.header.outside === '1' && s1.header.outOfRange === '3',
        `header: ${JSON.stringify(s1.header)}`);
      console.log(`[alarms.mjs]    listed: ${s1.items.map((i) => `${i.id} ${i.severity} ${i.colour}`).join('; ')}; header ${JSON.stringify(s1.header)}`);

      step('3. the truck\'s popup and panel show both of its alarms, not one status');
      await page.evaluate((id) => window.fleetwatch.openDevice(id), TRUCK);
      const badge = await poll('the panel\'s badge counting the truck\'s alarms', async () => {
        const t = await page.textContent('#device-status');
        return /2 alarms/.test(t) ? t : null;
      });
      assert(/critical/.test(await page.getAttribute('#device-status', 'title')), `the badge "${badge}" does not name the critical alarm`);
      const popup = await poll('the popup listing the truck\'s alarms', () => page.evaluate(() => {
        const items = [...document.querySelectorAll('.leaflet-popup-content .popup-alarm')];
        return items.length ? items.map((li) => ({ id: li.dataset.alarm, state: li.dataset.state, text: li.textContent.replace(/\s+/g, ' ').trim() })) : null;
      }));
      assert(popup.length === 2 && popup.some((p) => p.id === truckZone.id) && popup.some((p) => p.id === truckTemp.id),
        `the popup lists ${JSON.stringify(popup)}`);
      assert(popup[0].id === truckZone.id, `the critical alarm is not first in the popup: ${JSON.stringify(popup)}`);
      await page.evaluate(() => window.fleetwatch.map.closePopup());
      await page.click('#device-close');

      step('4. Acknowledge on the critical alarm: it turns acknowledged, and the API agrees');
      await page.click(`#alarm-list li[data-alarm="${truckZone.id}"] button[data-action="ack"]`);
      await poll('the alarm shown acknowledged', () => page.evaluate((id) => {
        const li = document.querySelector(`#alarm-list li[data-alarm="${id}"]`);
        return li && li.dataset.state === 'acknowledged' && !li.querySelector('button[data-action="ack"]');
      }, truckZone.id));
      const acked = await poll('GET /api/alarms to say acknowledged', async () => (await alarmsOf('acknowledged')).find((a) => a.id === truckZone.id));
      assert(acked.acknowledged && acked.sequence === 2, `acknowledged alarm: ${JSON.stringify(acked)}`);
      const s2 = await pageAgrees(page, 'the list and counters after the acknowledgement',
        (active) => active.some((a) => a.id === truckZone.id && a.state === 'acknowledged'));
      assert(s2.header.open === '3' && s2.header.acknowledged === '1', `header after acknowledging: ${JSON.stringify(s2.header)}`);

      step('5. acknowledging it again shows the API\'s refusal (409) at the alarm');
      await page.evaluate((id) => window.fleetwatch.acknowledgeAlarm(id), truckZone.id);
      const err = await poll('the 409 shown at the alarm', async () => {
        const item = (await shown(page)).items.find((i) => i.id === truckZone.id);
        return item && /409/.test(item.error) ? item.error : null;
      });
      const again = await api('POST', `/api/alarms/${encodeURIComponent(truckZone.id)}/ack`, {});
      assert(again.status === 409 && again.json && again.json.error, `acknowledging again through the API: ${again.status} ${again.text}`);
      assert(err.includes(again.json.error), `the page shows "${err}", the API says "${again.json.error}"`);

      step('6. a reading back inside the zone clears the alarm: it leaves the list');
      await postReading(TRUCK, INSIDE, 12);
      await poll('the cleared alarm to leave the list', () => page.evaluate((id) => !document.querySelector(`#alarm-list li[data-alarm="${id}"]`), truckZone.id));
      const cleared = await poll('GET /api/alarms to say cleared', async () => (await alarmsOf('cleared')).find((a) => a.id === truckZone.id));
      assert(cleared.sequence === 3, `cleared alarm: ${JSON.stringify(cleared)}`);
      const s3 = await pageAgrees(page, 'the list and counters after the clear', (active) => !active.some((a) => a.id === truckZone.id));
      assert(s3.items.length === 3 && s3.header.open === '3' && s3.header.acknowledged === '0' && s3.header.outside === '0',
        `after the clear: ${JSON.stringify(s3.header)}, ${s3.items.map((i) => i.id).join(', ')}`);

      step('7. a new condition opens an alarm that appears live, at the top; another clears');
      await postReading(LATE, INSIDE, 14);
      await postReading(VAN, INSIDE, 5);
      const s4 = await pageAgrees(page, 'the new alarm listed and the van\'s gone',
        (active) => active.some((a) => a.device_id === LATE) && !active.some((a) => a.id === vanTemp.id));
      const late = s4.apiAlarms.find((a) => a.device_id === LATE);
      assert(late && s4.items[0].id === late.id && s4.items[0].state === 'open' && s4.items[0].severity === 'warning',
        `the newest alarm shown first: ${JSON.stringify(s4.items[0])}, the API: ${JSON.stringify(late)}`);
      assert(!s4.items.some((i) => i.id === vanTemp.id), 'the van\'s cleared alarm is still listed');
      assert(s4.header.open === '3' && s4.header.acknowledged === '0', `header: ${JSON.stringify(s4.header)}`);
      console.log(`[alarms.mjs]    finally: ${s4.items.map((i) => `${i.id} ${i.state}`).join('; ')}; header ${JSON.stringify(s4.header)}`);

      step('8. screenshot');
      await page.screenshot({ path: SHOT, fullPage: true });
      const serious = problems.filter((p) => !/favicon\.ico/.test(p));
      assert(serious.length === 0, `the page reported problems:\n  ${serious.join('\n  ')}`);
    } catch (e) {
      await reportFailure(page, SHOT, problems);
      throw e;
    }
  } finally {
    await browser.close();
  }
}

run(main, OVERALL_TIMEOUT_MS);

#!/usr/bin/env node
// End-to-end test of the fleetwatch map page in a real (headless) browser.
//
//   node tests/browser/map.mjs <base_url> <screenshot_path>
//
// Expects an engine already running at <base_url> with an empty data dir. Drives Debian's
// chromium (/usr/bin/chromium, override with FLEETWATCH_CHROMIUM) through playwright-core.
// Exit code 0 = pass; otherwise the failing step is printed, and a screenshot of the page at
// that moment is written next to <screenshot_path> (suffix ".failure.png").

import fs from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';

const [baseArg, shotArg] = process.argv.slice(2);
if (!baseArg || !shotArg) {
  console.error('usage: node map.mjs <base_url> <screenshot_path>');
  process.exit(2);
}
const BASE = baseArg.replace(/\/+$/, '');
const SHOT = path.resolve(shotArg);
const CHROMIUM = process.env.FLEETWATCH_CHROMIUM || '/usr/bin/chromium';
const HEADED = process.env.FLEETWATCH_HEADED === '1';
const WAIT_MS = 10_000;
const OVERALL_TIMEOUT_MS = 120_000;

const DEVICE = 'e2e-truck';
const ZONE_ID = 'e2e-amsterdam';
const ZONE_NAME = 'E2E Amsterdam';
const POLYGON_NAME = `E2E drawn polygon ${Date.now().toString(36)}`;
const RANGE_NAME = 'E2E cold chain';
const T0 = Date.now();
let readingNo = 0;

let currentStep = 'start';
function step(name) {
  currentStep = name;
  console.log(`[map.mjs] ${name}`);
}

class TestFailure extends Error {}
function fail(msg) { throw new TestFailure(msg); }
function assert(cond, msg) { if (!cond) fail(msg); }

// ---- HTTP helpers (Node 18+ fetch) ----

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

/** POST one reading with a timestamp that increases per reading. */
async function postReading(lat, lon, temperature) {
  readingNo += 1;
  const timestamp = new Date(T0 + readingNo * 1000).toISOString();
  const r = await expectStatus('POST', '/api/readings', { device_id: DEVICE, timestamp, lat, lon, temperature }, 202);
  assert(r && r.accepted === 1, `reading #${readingNo} was not accepted: ${JSON.stringify(r)}`);
  return r;
}

async function poll(what, fn, timeoutMs = WAIT_MS) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) fail(`timed out after ${timeoutMs} ms waiting for ${what}${last instanceof Error ? ` (last error: ${last.message})` : ''}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

// ---- browser-side probes ----

const markerInfo = (page, id) => page.evaluate((deviceId) => {
  const fw = window.fleetwatch;
  const m = fw && fw.markers.get(deviceId);
  if (!m) return null;
  const ll = m.getLatLng();
  return { lat: ll.lat, lon: ll.lng, fill: m.options.fillColor, status: m.status || null };
}, id);

const near = (a, b, eps = 1e-6) => Math.abs(a - b) <= eps;

async function waitForMarkerAt(page, lat, lon) {
  return poll(`the marker of ${DEVICE} at ${lat}, ${lon}`, async () => {
    const m = await markerInfo(page, DEVICE);
    return m && near(m.lat, lat) && near(m.lon, lon) ? m : null;
  });
}

async function waitConnected(page) {
  await page.waitForFunction(
    () => document.querySelector('#connection-state')?.textContent.trim() === 'connected',
    null, { timeout: WAIT_MS },
  ).catch(async () => {
    const text = await page.textContent('#connection-state').catch(() => '?');
    fail(`#connection-state never read "connected" (it reads "${text}")`);
  });
}

async function main() {
  fs.mkdirSync(path.dirname(SHOT), { recursive: true });

  step('engine health');
  await poll(`${BASE}/api/health`, async () => (await api('GET', '/api/health')).status === 200);

  step('clean up what an earlier run of this script left (none on an empty data dir)');
  for (const z of (await expectStatus('GET', '/api/zones', undefined, 200)) || []) {
    if (z.id === ZONE_ID || String(z.name || '').startsWith('E2E drawn polygon')) {
      await expectStatus('DELETE', `/api/zones/${encodeURIComponent(z.id)}`, undefined, 204, 404);
    }
  }
  for (const r of (await expectStatus('GET', '/api/temperature-ranges', undefined, 200)) || []) {
    if (r.name === RANGE_NAME) await expectStatus('DELETE', `/api/temperature-ranges/${encodeURIComponent(r.id)}`, undefined, 204, 404);
  }

  step('1. create a circle zone around Amsterdam via the API');
  const zoneBody = {
    id: ZONE_ID,
    name: ZONE_NAME,
    shape: { type: 'circle', center: { lat: 52.37, lon: 4.89 }, radius_m: 2000 },
    devices: [DEVICE],
  };
  const created = await api('POST', '/api/zones', zoneBody);
  assert(created.status === 201, `POST /api/zones answered ${created.status}: ${created.text}`);
  assert(created.json && created.json.id === ZONE_ID, `POST /api/zones returned ${created.text}`);

  step('launch chromium');
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: !HEADED,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const problems = [];
  let page;
  try {
    const context = await browser.newContext({ viewport: { width: 1440, height: 900 } });
    page = await context.newPage();
    const baseOrigin = new URL(BASE).origin;
    page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
    page.on('console', (m) => {
      if (m.type() === 'error') problems.push(`console error: ${m.text()}`);
    });
    page.on('request', (req) => {
      const u = new URL(req.url());
      if (!['data:', 'blob:', 'about:'].includes(u.protocol) && u.origin !== baseOrigin) {
        problems.push(`request to an outside URL: ${req.url()}`);
      }
    });
    page.on('response', (res) => {
      const u = new URL(res.url());
      if (res.status() >= 400 && !u.pathname.endsWith('.map')) problems.push(`HTTP ${res.status()} for ${res.url()}`);
    });

    try {
      step('open the page and wait for the live stream');
      await page.goto(`${BASE}/`, { waitUntil: 'load' });
      await page.waitForFunction(() => window.fleetwatch && window.L && window.L.PM, null, { timeout: WAIT_MS })
        .catch(() => fail('window.fleetwatch / Leaflet / geoman never appeared: the page or a /vendor script did not load'));
      await waitConnected(page);
      await poll(`zone ${ZONE_ID} drawn on the map`, () => page.evaluate((id) => window.fleetwatch.zones.has(id), ZONE_ID));

      step('2. a reading inside the zone shows a marker');
      const p1 = { lat: 52.372, lon: 4.893 };
      await postReading(p1.lat, p1.lon, 4.0);
      const m1 = await waitForMarkerAt(page, p1.lat, p1.lon);
      assert(m1.status === 'normal' || m1.status === null, `marker status after an in-zone reading is ${m1.status}`);

      step('2b. a reading ~500 m further (still inside) moves the marker');
      const p2 = { lat: 52.3765, lon: 4.893 };
      await postReading(p2.lat, p2.lon, 4.2);
      await waitForMarkerAt(page, p2.lat, p2.lon);

      step('3. a reading far outside raises an alarm in the feed and recolours the marker');
      const p3 = { lat: 52.09, lon: 5.12 }; // Utrecht, ~35 km away
      await postReading(p3.lat, p3.lon, 4.4);
      const m3 = await waitForMarkerAt(page, p3.lat, p3.lon);
      const entrySel = `#alarm-feed .alarm-entry[data-device="${DEVICE}"]`;
      const entryText = await poll(`an alarm entry for ${DEVICE} in #alarm-feed`, async () => {
        const texts = await page.$$eval(entrySel, (els) => els.map((e) => e.textContent));
        return texts.find((t) => t.includes(ZONE_NAME) || t.includes(ZONE_ID)) || null;
      });
      assert(/left|outside/i.test(entryText), `alarm entry does not say the device left the zone: "${entryText}"`);
      const m3b = await poll(`the marker of ${DEVICE} to change colour`, async () => {
        const m = await markerInfo(page, DEVICE);
        return m && m.fill !== m1.fill ? m : null;
      });
      console.log(`[map.mjs]    alarm entry: "${entryText.trim()}"; marker colour ${m1.fill} -> ${m3b.fill}`);
      const dev = await expectStatus('GET', `/api/devices/${DEVICE}`, undefined, 200);
      assert(dev.status === 'out_of_zone', `GET /api/devices/${DEVICE} says status ${dev.status}, expected out_of_zone`);
      void m3;

      step('3b. clicking the alarm entry shows the device popup with its recent events');
      await page.click(entrySel);
      await poll('the device popup with its events', async () => {
        const t = await page.textContent('.leaflet-popup-content').catch(() => null);
        return t && t.includes(DEVICE) && t.includes('LeftZone') ? t : null;
      });
      await page.evaluate(() => window.fleetwatch.map.closePopup());

      step('4. draw a polygon zone through the page UI');
      // Somewhere empty north-west of Amsterdam, away from the existing zone and the marker.
      await page.evaluate(() => window.fleetwatch.map.setView([52.6, 4.6], 11, { animate: false }));
      await page.waitForTimeout(300); // let the view settle (no animation, but tiles/labels redraw)
      const polyButton = page.locator('.leaflet-pm-toolbar .leaflet-pm-icon-polygon').first();
      await polyButton.waitFor({ state: 'visible', timeout: WAIT_MS })
        .catch(() => fail('geoman toolbar polygon button (.leaflet-pm-icon-polygon) not found'));
      await polyButton.click();
      await poll('geoman polygon draw mode', () => page.evaluate(() => window.fleetwatch.map.pm.Draw.Polygon.enabled()));
      const box = await page.locator('#map').boundingBox();
      const cx = box.x + box.width / 2;
      const cy = box.y + box.height / 2;
      const vertices = [[cx - 150, cy - 100], [cx + 150, cy - 110], [cx + 120, cy + 110], [cx - 130, cy + 90]];
      for (const [x, y] of vertices) {
        await page.mouse.move(x, y, { steps: 3 });
        await page.mouse.click(x, y);
        await page.waitForTimeout(120);
      }
      await page.mouse.move(vertices[0][0], vertices[0][1], { steps: 3 });
      await page.mouse.click(vertices[0][0], vertices[0][1]); // click the first vertex to finish
      await page.locator('#zone-panel').waitFor({ state: 'visible', timeout: WAIT_MS })
        .catch(() => fail('#zone-panel did not appear after finishing the polygon'));
      await page.fill('#zone-name', POLYGON_NAME);
      await page.click('#zone-save');
      const saved = await poll(`GET /api/zones to list "${POLYGON_NAME}"`, async () => {
        const r = await api('GET', '/api/zones');
        return r.status === 200 && Array.isArray(r.json) ? r.json.find((z) => z.name === POLYGON_NAME) : null;
      });
      assert(saved.shape && saved.shape.type === 'polygon', `drawn zone saved with shape ${JSON.stringify(saved.shape)}`);
      const distinct = new Set(saved.shape.points.map((p) => `${p.lat},${p.lon}`));
      assert(distinct.size === vertices.length, `drawn zone has ${distinct.size} distinct vertices, expected ${vertices.length}: ${JSON.stringify(saved.shape.points)}`);
      const inView = await page.evaluate((pts) => {
        const b = window.fleetwatch.map.getBounds();
        return pts.every((p) => b.contains([p.lat, p.lon]));
      }, saved.shape.points);
      assert(inView, `drawn zone's vertices are not where they were clicked: ${JSON.stringify(saved.shape.points)}`);
      // The API can list the zone before the page has handled its own save response.
      await page.locator('#zone-panel').waitFor({ state: 'hidden', timeout: WAIT_MS })
        .catch(() => fail('#zone-panel is still shown after saving'));
      console.log(`[map.mjs]    saved zone ${saved.id} "${saved.name}" with ${distinct.size} vertices`);

      step('4b. add a temperature range through the page form');
      await page.fill('#range-name', RANGE_NAME);
      await page.fill('#range-min', '2');
      await page.fill('#range-max', '8');
      await page.click('#range-save');
      const range = await poll(`GET /api/temperature-ranges to list "${RANGE_NAME}"`, async () => {
        const r = await api('GET', '/api/temperature-ranges');
        return r.status === 200 && Array.isArray(r.json) ? r.json.find((x) => x.name === RANGE_NAME) : null;
      });
      assert(range.min === 2 && range.max === 8, `range saved as ${JSON.stringify(range)}`);
      await poll('the range listed in the sidebar', async () => (await page.textContent('#range-list')).includes(RANGE_NAME));

      step('4c. reload: the drawn zone is drawn again');
      await page.reload({ waitUntil: 'load' });
      await waitConnected(page);
      await poll(`zone ${saved.id} drawn after the reload`, () => page.evaluate(
        (ids) => ids.every((id) => window.fleetwatch.zones.has(id)), [saved.id, ZONE_ID],
      ));
      const after = await poll(`the marker of ${DEVICE} after the reload`, () => markerInfo(page, DEVICE));
      assert(near(after.lat, p3.lat) && near(after.lon, p3.lon), `marker after reload at ${after.lat}, ${after.lon}`);
      assert(after.fill === m3b.fill, `marker colour after reload ${after.fill}, before ${m3b.fill}`);

      step('4d. a too-warm reading raises a temperature alarm');
      await postReading(p3.lat, p3.lon + 0.01, 9.5);
      await poll(`a temperature alarm entry for ${DEVICE}`, async () => {
        const texts = await page.$$eval(`${entrySel}[data-type="TemperatureOutOfRange"]`, (els) => els.map((e) => e.textContent));
        return texts.find((t) => /above/.test(t)) || null;
      });
      await poll(`the marker of ${DEVICE} to turn to the temperature-alarm colour`, async () => {
        const m = await markerInfo(page, DEVICE);
        return m && m.fill !== m3b.fill && m.fill !== m1.fill ? m : null;
      });

      step('5. screenshot');
      await page.evaluate(() => window.fleetwatch.fitAll());
      await page.waitForTimeout(600);
      // Open the device popup by clicking its marker, for a more telling screenshot.
      const pt = await page.evaluate((id) => {
        const fw = window.fleetwatch;
        const p = fw.map.latLngToContainerPoint(fw.markers.get(id).getLatLng());
        return { x: p.x, y: p.y };
      }, DEVICE);
      const mapBox = await page.locator('#map').boundingBox();
      await page.mouse.click(mapBox.x + pt.x, mapBox.y + pt.y);
      await poll('the device popup after clicking its marker', async () => {
        const t = await page.textContent('.leaflet-popup-content').catch(() => null);
        return t && t.includes(DEVICE) && t.includes('TemperatureOutOfRange') ? t : null;
      });
      await page.waitForTimeout(500);
      await page.screenshot({ path: SHOT, fullPage: true });
      console.log(`[map.mjs]    screenshot: ${SHOT}`);

      const serious = problems.filter((p) => !/favicon\.ico/.test(p));
      assert(serious.length === 0, `the page reported problems:\n  ${serious.join('\n  ')}`);
    } catch (e) {
      if (page) {
        const failShot = SHOT.replace(/(\.png)?$/, '.failure.png');
        await page.screenshot({ path: failShot, fullPage: true }).catch(() => {});
        console.error(`[map.mjs] screenshot of the failure: ${failShot}`);
      }
      if (problems.length) console.error(`[map.mjs] page problems seen:\n  ${problems.join('\n  ')}`);
      throw e;
    }
  } finally {
    await browser.close();
  }
}

const timer = setTimeout(() => {
  console.error(`[map.mjs] FAIL: gave up after ${OVERALL_TIMEOUT_MS / 1000} s (step: ${currentStep})`);
  process.exit(3);
}, OVERALL_TIMEOUT_MS);

main().then(() => {
  clearTimeout(timer);
  console.log('[map.mjs] PASS');
  process.exit(0);
}, (e) => {
  clearTimeout(timer);
  console.error(`[map.mjs] FAIL in step "${currentStep}": ${e instanceof TestFailure ? e.message : (e && e.stack) || e}`);
  process.exit(1);
});

#!/usr/bin/env node
// End-to-end test of the fleetwatch map page in a real (headless) browser.
//
//   node tests/browser/map.mjs <base_url> <screenshot_path>
//
// Markers, zones drawn through the page, alarms and ranges; then a device's panel: its chart of
// temperature buckets (uPlot) and its track on the map, for readings this script sends, with the
// range and bucket selectors, errors from the API shown in the panel, and the fleet panel.
// Devices are drawn on a canvas, so the script reads them through `window.fleetwatch`
// (markers, markerState) rather than DOM elements.
//
// Expects an engine already running at <base_url> with an empty data dir. Drives Debian's
// chromium (/usr/bin/chromium, override with FLEETWATCH_CHROMIUM) through playwright-core.
// Exit code 0 = pass; otherwise the failing step is printed, and a screenshot of the page at
// that moment is written next to <screenshot_path> (suffix ".failure.png").

import fs from 'node:fs';
import path from 'node:path';
import { args, assert, fail, launchChromium, poller, reportFailure, run, step } from './lib.mjs';

const ARGS = args('base_url', 'screenshot_path');
const BASE = ARGS.base_url;
const SHOT = ARGS.screenshot_path;
const WAIT_MS = 10_000;
const OVERALL_TIMEOUT_MS = 120_000;

const DEVICE = 'e2e-truck';
const CHART_DEVICE = 'e2e-chart';
const UNKNOWN_DEVICE = 'e2e-no-such-device';
const ZONE_ID = 'e2e-amsterdam';
const ZONE_NAME = 'E2E Amsterdam';
const POLYGON_NAME = `E2E drawn polygon ${Date.now().toString(36)}`;
const RANGE_NAME = 'E2E cold chain';
const T0 = Date.now();
let readingNo = 0;


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

const poll = poller(WAIT_MS);

// ---- browser-side probes ----

// What the page shows for a device's canvas marker: { lat, lon, status, fill, highlighted, x, y, ... }.
const markerInfo = (page, id) => page.evaluate((deviceId) => window.fleetwatch && window.fleetwatch.markerState(deviceId), id);

/**
 * What the devices' canvas shows at a device's marker, after centring the map on it: the pixel's
 * colour (#rrggbb) and alpha, and whether the marker is on that canvas's renderer, with no element.
 */
const paintedAt = (page, id) => page.evaluate(async (deviceId) => {
  const fw = window.fleetwatch;
  const m = fw.markers.get(deviceId);
  if (!m) return null;
  fw.map.setView(m.getLatLng(), Math.max(fw.map.getZoom(), 10), { animate: false });
  // Until no repaint is pending: the canvas shows the marker where it is now.
  for (let i = 0; i < 60 && (i < 2 || fw.deviceRenderer._redrawRequest); i++) await new Promise((r) => requestAnimationFrame(r));
  const s = fw.markerState(deviceId);
  const canvas = fw.deviceRenderer._container;
  const rect = canvas.getBoundingClientRect();
  const mapRect = fw.map.getContainer().getBoundingClientRect();
  const x = Math.round((mapRect.left + s.x - rect.left) * (canvas.width / rect.width));
  const y = Math.round((mapRect.top + s.y - rect.top) * (canvas.height / rect.height));
  const [r, g, b, a] = canvas.getContext('2d').getImageData(x, y, 1, 1).data;
  return {
    fill: s.fill,
    pixel: `#${[r, g, b].map((v) => v.toString(16).padStart(2, '0')).join('')}`,
    alpha: a,
    onCanvas: m.options.renderer === fw.deviceRenderer && canvas instanceof HTMLCanvasElement && !m.getElement(),
  };
}, id);

/**
 * The chart's buckets with data (uPlot's data: x = bucket start in seconds; null gaps dropped),
 * and whether the mean line is painted at each of them on the chart's canvas.
 */
const chartInfo = (page) => page.evaluate(() => {
  const p = window.fleetwatch.devicePanel;
  const u = p.chart;
  if (!u) return null;
  const [xs, mins, maxs, means, counts] = u.data;
  const canvas = u.ctx.canvas;
  const ctx = canvas.getContext('2d');
  const buckets = [];
  for (let i = 0; i < xs.length; i++) {
    if (means[i] === null || means[i] === undefined) continue;
    // A 9x9 box around (start, mean) in canvas pixels: the mean line or point is there.
    const cx = Math.round(u.valToPos(xs[i], 'x', true));
    const cy = Math.round(u.valToPos(means[i], 'temp', true));
    const img = ctx.getImageData(cx - 4, cy - 4, 9, 9).data;
    let painted = false;
    for (let k = 0; k < img.length; k += 4) {
      const [r, g, b, a] = [img[k], img[k + 1], img[k + 2], img[k + 3]];
      if (a > 150 && b > r + 60 && b > g + 40) { painted = true; break; } // the mean's blue
    }
    buckets.push({ start: xs[i], min: mins[i], max: maxs[i], mean: means[i], count: counts[i], painted });
  }
  return {
    device: p.deviceId, bucket: p.bucket, draws: p.chartDraws, buckets, error: p.error,
    info: document.querySelector('#device-chart-info').textContent,
    width: canvas.width, height: canvas.height,
  };
});

/** The track drawn for the panel's device: its points, and its SVG path in the tracks pane. */
const trackInfo = (page) => page.evaluate(() => {
  const fw = window.fleetwatch;
  const p = fw.devicePanel;
  const path = document.querySelector('.leaflet-tracks-pane path.device-track');
  return {
    device: p.deviceId,
    onMap: !!(p.track && fw.map.hasLayer(p.track)),
    points: p.track ? p.track.getLatLngs().map((ll) => [ll.lat, ll.lng]) : [],
    capped: p.trackCapped,
    pathDevice: path && path.getAttribute('data-device'),
    pathD: path ? path.getAttribute('d') || '' : null,
    info: document.querySelector('#device-track-info').textContent,
  };
});

/** Waits for the panel to finish a load of `device` after `loadsBefore` loads. */
async function waitPanelLoad(page, device, loadsBefore) {
  // A load of the device shown before may finish meanwhile: it must be one of `device`.
  return poll(`the device panel of ${device} to load`, () => page.evaluate(([id, n]) => {
    const p = window.fleetwatch.devicePanel;
    return p.deviceId === id && p.loadedDevice === id && p.loads > n && !document.querySelector('#device-panel').hidden ? p.loads : null;
  }, [device, loadsBefore]));
}

const panelLoads = (page) => page.evaluate(() => window.fleetwatch.devicePanel.loads);

const near = (a, b, eps = 1e-6) => Math.abs(a - b) <= eps;

async function waitForMarkerOf(page, id, lat, lon) {
  return poll(`the marker of ${id} at ${lat}, ${lon}`, async () => {
    const m = await markerInfo(page, id);
    return m && m.on_map && near(m.lat, lat) && near(m.lon, lon) ? m : null;
  });
}

const waitForMarkerAt = (page, lat, lon) => waitForMarkerOf(page, DEVICE, lat, lon);

const round6 = (v) => Math.round(v * 1e6) / 1e6;

/** Answers >= 400 the script asks for on purpose (URL patterns); any other is a problem. */
const expectedErrors = [];
const expectedError = (url) => expectedErrors.some((re) => re.test(url));

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
  const browser = await launchChromium();
  const problems = [];
  let page;
  try {
    const context = await browser.newContext({ viewport: { width: 1440, height: 900 } });
    page = await context.newPage();
    const baseOrigin = new URL(BASE).origin;
    page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
    page.on('console', (m) => {
      // Chromium logs every failed request; the ones asked for on purpose are fine.
      if (m.type() === 'error' && !(/status of 40[04]/.test(m.text()) && expectedError(m.location().url || ''))) {
        problems.push(`console error: ${m.text()}`);
      }
    });
    page.on('request', (req) => {
      const u = new URL(req.url());
      if (!['data:', 'blob:', 'about:'].includes(u.protocol) && u.origin !== baseOrigin) {
        problems.push(`request to an outside URL: ${req.url()}`);
      }
    });
    page.on('response', (res) => {
      const u = new URL(res.url());
      if (res.status() >= 400 && !u.pathname.endsWith('.map') && !expectedError(res.url())) problems.push(`HTTP ${res.status()} for ${res.url()}`);
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
      let px1 = null;
      await poll(`the devices' canvas to show the marker's colour ${m1.fill} at it`, async () => {
        px1 = await paintedAt(page, DEVICE);
        return px1.onCanvas && px1.pixel === m1.fill && px1.alpha === 255;
      }).catch((e) => fail(`${e.message}; last seen ${JSON.stringify(px1)}`));

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
      // The canvas marker has no element: the highlight is an SVG ring around it.
      await poll(`the pulsing highlight ring around ${DEVICE}`, () => page.evaluate((id) => {
        const ring = document.querySelector(`.leaflet-highlights-pane path.device-highlight.pulse[data-device="${id}"]`);
        return ring && window.fleetwatch.markerState(id).highlighted ? true : null;
      }, DEVICE));
      const m3b = await poll(`the marker of ${DEVICE} to change colour`, async () => {
        const m = await markerInfo(page, DEVICE);
        return m && m.fill !== m1.fill ? m : null;
      });
      let px3 = null;
      await poll(`the devices' canvas to show the new colour ${m3b.fill} at the marker`, async () => {
        px3 = await paintedAt(page, DEVICE);
        return px3.pixel === m3b.fill && px3.alpha === 255;
      }).catch((e) => fail(`${e.message}; last seen ${JSON.stringify(px3)}`));
      console.log(`[map.mjs]    alarm entry: "${entryText.trim()}"; marker colour ${m1.fill} -> ${m3b.fill} (on the canvas: ${px1.pixel} -> ${px3.pixel})`);
      const dev = await expectStatus('GET', `/api/devices/${DEVICE}`, undefined, 200);
      assert(dev.status === 'out_of_zone', `GET /api/devices/${DEVICE} says status ${dev.status}, expected out_of_zone`);
      void m3;

      step('3b. clicking the alarm entry shows the device popup with its recent events, and its panel');
      const loads3b = await panelLoads(page);
      await page.click(entrySel);
      await poll('the device popup with its events', async () => {
        const t = await page.textContent('.leaflet-popup-content').catch(() => null);
        return t && t.includes(DEVICE) && t.includes('LeftZone') ? t : null;
      });
      await waitPanelLoad(page, DEVICE, loads3b);
      await page.evaluate(() => window.fleetwatch.map.closePopup());
      await page.click('#device-close');

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


      step('4e. a device panel: the chart of its temperature buckets and its track on the map');
      // Readings dated in four consecutive whole minutes a few minutes ago (not in the future:
      // the engine refuses readings beyond --max-clock-skew), three per minute.
      const MINUTE = 60_000;
      const firstMinute = Math.floor(Date.now() / MINUTE) * MINUTE - 8 * MINUTE;
      const chartReadings = [];
      for (let m = 0; m < 4; m++) {
        [0, 0.5, 2.0].forEach((dt, k) => {
          const i = m * 3 + k;
          chartReadings.push({
            device_id: CHART_DEVICE,
            timestamp: new Date(firstMinute + m * MINUTE + k * 15_000).toISOString(),
            lat: round6(52.33 + i * 0.004),
            lon: round6(4.93 + (i % 2) * 0.006 + i * 0.002),
            temperature: 2.5 + m + dt,
          });
        });
      }
      const posted = await expectStatus('POST', '/api/readings', chartReadings, 202);
      assert(posted.accepted === 12 && posted.late === 0, `chart readings: ${JSON.stringify(posted)}`);
      const expected = [0, 1, 2, 3].map((m) => {
        const temps = chartReadings.slice(m * 3, m * 3 + 3).map((r) => r.temperature);
        return {
          start: (firstMinute + m * MINUTE) / 1000,
          count: 3,
          mean: temps.reduce((a, b) => a + b, 0) / 3,
          min: Math.min(...temps),
          max: Math.max(...temps),
        };
      });
      // The read models follow the store about a second behind.
      const span = `from=${new Date(firstMinute - MINUTE).toISOString()}&to=${new Date().toISOString()}`;
      await poll(`the engine's ${expected.length} minute buckets of ${CHART_DEVICE}`, async () => {
        const r = await api('GET', `/api/devices/${CHART_DEVICE}/temperature?bucket=minute&${span}`);
        return r.status === 200 && r.json.buckets.length === expected.length && r.json.buckets.every((b) => b.count === 3);
      });
      const last = chartReadings[chartReadings.length - 1];
      await waitForMarkerOf(page, CHART_DEVICE, last.lat, last.lon);

      // Click its marker on the canvas.
      await page.evaluate(([lat, lon]) => {
        window.fleetwatch.map.closePopup();
        window.fleetwatch.map.setView([lat, lon], 14, { animate: false });
      }, [last.lat, last.lon]);
      await page.waitForTimeout(300);
      let loads = await panelLoads(page);
      const target = await markerInfo(page, CHART_DEVICE);
      const mapBox0 = await page.locator('#map').boundingBox();
      await page.mouse.click(mapBox0.x + target.x, mapBox0.y + target.y);
      await waitPanelLoad(page, CHART_DEVICE, loads);
      await poll(`the popup of ${CHART_DEVICE} (a click on its marker opens both)`, async () => {
        const t = await page.textContent('.leaflet-popup-content').catch(() => null);
        return t && t.includes(CHART_DEVICE) ? t : null;
      });
      assert((await page.textContent('#device-name')).trim() === CHART_DEVICE, 'the panel names another device');
      assert(await page.inputValue('#device-range') === '1h' && await page.inputValue('#device-bucket') === 'minute',
        'the panel does not start on the last hour by minute');

      const chart = await chartInfo(page);
      assert(chart && !chart.error, `the panel shows an error: ${chart && chart.error}`);
      assert(chart.draws > 0 && chart.width > 100 && chart.height > 50, `the chart was not drawn: ${JSON.stringify(chart)}`);
      assert(chart.buckets.length === expected.length,
        `the chart has ${chart.buckets.length} buckets, expected ${expected.length}: ${JSON.stringify(chart.buckets)}`);
      chart.buckets.forEach((b, i) => {
        const e = expected[i];
        assert(b.start === e.start && b.count === e.count && near(b.mean, e.mean) && near(b.min, e.min) && near(b.max, e.max),
          `chart bucket ${i} is ${JSON.stringify(b)}, expected ${JSON.stringify(e)}`);
        assert(b.painted, `the mean line is not painted at bucket ${i} (${JSON.stringify(b)})`);
      });
      assert(/4 minute buckets · 12 readings/.test(chart.info), `chart caption: "${chart.info}"`);
      console.log(`[map.mjs]    chart: ${chart.buckets.map((b) => `${b.count}×${b.mean.toFixed(3)} [${b.min}…${b.max}]`).join(', ')}`);

      const track = await trackInfo(page);
      const sent = chartReadings.map((r) => [r.lat, r.lon]);
      assert(track.onMap && track.device === CHART_DEVICE, `the track is not on the map: ${JSON.stringify(track)}`);
      assert(track.points.length === sent.length && track.points.every(([la, lo], i) => near(la, sent[i][0]) && near(lo, sent[i][1])),
        `the track's points ${JSON.stringify(track.points)} are not the readings' ${JSON.stringify(sent)}`);
      assert(track.pathDevice === CHART_DEVICE && /^M/.test(track.pathD) && (track.pathD.match(/L/g) || []).length >= 1,
        `the track's SVG path: ${track.pathDevice} "${track.pathD}"`);
      assert(!track.capped && /Track: 12 readings/.test(track.info), `track caption: "${track.info}"`);
      const trackInView = await page.evaluate(() => window.fleetwatch.map.getBounds().contains(window.fleetwatch.devicePanel.track.getBounds()));
      assert(trackInView, 'the track is not in view');

      step('4f. the range selector: last 24 hours by hour (the selector picks the bucket)');
      loads = await panelLoads(page);
      await page.selectOption('#device-range', '24h');
      await waitPanelLoad(page, CHART_DEVICE, loads);
      assert(await page.inputValue('#device-bucket') === 'hour', 'choosing 24 hours did not choose hour buckets');
      const hourly = await chartInfo(page);
      const hours = new Map();
      for (const r of chartReadings) {
        const h = Math.floor(Date.parse(r.timestamp) / 3_600_000) * 3600;
        hours.set(h, [...(hours.get(h) || []), r.temperature]);
      }
      assert(hourly.bucket === 'hour' && hourly.buckets.length === hours.size,
        `hour buckets: ${JSON.stringify(hourly.buckets)}, expected ${hours.size}`);
      for (const b of hourly.buckets) {
        const temps = hours.get(b.start);
        assert(temps && b.count === temps.length && near(b.mean, temps.reduce((x, y) => x + y, 0) / temps.length)
          && near(b.min, Math.min(...temps)) && near(b.max, Math.max(...temps)),
          `hour bucket ${JSON.stringify(b)} does not match the readings`);
      }
      assert((await trackInfo(page)).points.length === sent.length, 'the track over 24 hours lost points');

      step('4g. an impossible choice shows the API\'s error in the panel (30 days by minute: 400)');
      loads = await panelLoads(page);
      await page.selectOption('#device-range', '30d');
      await waitPanelLoad(page, CHART_DEVICE, loads);
      assert(await page.inputValue('#device-bucket') === 'day', 'choosing 30 days did not choose day buckets');
      assert(!(await chartInfo(page)).error, 'the panel shows an error for 30 days by day');
      loads = await panelLoads(page);
      expectedErrors.push(new RegExp(`/api/devices/${CHART_DEVICE}/temperature\\?.*bucket=minute`));
      await page.selectOption('#device-bucket', 'minute');
      await waitPanelLoad(page, CHART_DEVICE, loads);
      const errText = await page.textContent('#device-error');
      assert(/HTTP 400/.test(errText) && /10000/.test(errText) && /from/.test(errText),
        `#device-error after 30 days by minute: "${errText}"`);
      assert(await page.isVisible('#device-error'), '#device-error is not visible');
      console.log(`[map.mjs]    shown: "${errText.trim()}"`);
      assert((await trackInfo(page)).points.length === sent.length, 'the track went away with the chart error');

      step('4h. an unknown device from the search field: 404 shown in the panel');
      expectedErrors.push(new RegExp(`/api/devices/${UNKNOWN_DEVICE}/`));
      loads = await panelLoads(page);
      await page.fill('#device-search', UNKNOWN_DEVICE);
      await page.click('#device-search-go');
      await waitPanelLoad(page, UNKNOWN_DEVICE, loads);
      const err404 = await page.textContent('#device-error');
      assert(/HTTP 404/.test(err404), `#device-error for an unknown device: "${err404}"`);
      assert(!(await trackInfo(page)).onMap, 'a track is drawn for an unknown device');

      step('4i. closing the panel removes the track');
      await page.selectOption('#device-range', '1h');
      loads = await panelLoads(page);
      await page.fill('#device-search', CHART_DEVICE);
      await page.click('#device-search-go');
      await waitPanelLoad(page, CHART_DEVICE, loads);
      assert((await trackInfo(page)).onMap, 'the track is not back');
      await page.click('#device-close');
      assert(await page.isHidden('#device-panel'), 'the panel is still shown');
      const closed = await trackInfo(page);
      assert(!closed.onMap && closed.pathD === null && closed.points.length === 0, `the track is still drawn: ${JSON.stringify(closed)}`);

      step('4j. the fleet panel: statistics and top devices from the engine');
      await page.evaluate(() => Promise.all([window.fleetwatch.refreshFleet(), window.fleetwatch.refreshTop()]));
      const fleetShown = await poll('the fleet panel\'s figures', async () => {
        const f = await page.evaluate(() => ({
          known: document.querySelector('#fleet-known').textContent,
          active: document.querySelector('#fleet-active').textContent,
          outside: document.querySelector('#fleet-outside').textContent,
          perMinute: document.querySelector('#fleet-readings-1m').textContent,
          error: document.querySelector('#fleet-error').textContent,
          top: [...document.querySelectorAll('#fleet-top li[data-device]')].map((li) => li.dataset.device),
          updates: window.fleetwatch.fleet.updates,
        }));
        return f.known === '2' && f.top.includes(CHART_DEVICE) ? f : null;
      });
      const stats = await expectStatus('GET', '/api/stats', undefined, 200);
      assert(fleetShown.error === '' && fleetShown.updates >= 1, `fleet panel: ${JSON.stringify(fleetShown)}`);
      assert(Number(fleetShown.outside) === stats.devices.outside_a_zone, `fleet panel says ${fleetShown.outside} outside a zone, the engine ${stats.devices.outside_a_zone}`);
      assert(fleetShown.top[0] === CHART_DEVICE, `top devices by readings: ${fleetShown.top.join(', ')}`);
      console.log(`[map.mjs]    fleet panel: ${JSON.stringify(fleetShown)}`);
      loads = await panelLoads(page);
      await page.click(`#fleet-top li[data-device="${CHART_DEVICE}"]`);
      await waitPanelLoad(page, CHART_DEVICE, loads);
      assert((await trackInfo(page)).points.length === sent.length, 'the panel opened from the top list has no track');
      await page.click('#device-close');

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
      const loads5 = await panelLoads(page);
      await page.mouse.click(mapBox.x + pt.x, mapBox.y + pt.y);
      await poll('the device popup after clicking its marker', async () => {
        const t = await page.textContent('.leaflet-popup-content').catch(() => null);
        return t && t.includes(DEVICE) && t.includes('TemperatureOutOfRange') ? t : null;
      });
      await waitPanelLoad(page, DEVICE, loads5);
      // The popup would hide the track: the screenshot shows the map, the track and the chart.
      await page.evaluate(() => window.fleetwatch.map.closePopup());
      await page.waitForTimeout(500);
      await page.screenshot({ path: SHOT, fullPage: true });
      console.log(`[map.mjs]    screenshot: ${SHOT}`);

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

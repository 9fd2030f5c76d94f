// Alarms under load: do zone and temperature alarms get raised, and do they reach an SSE client?
//
//   k6 run k6/alarms.js -e DEVICES=10000 -e DURATION=60s -e ROGUE_FRACTION=0.05
//
// 1. setup: PUT a circle zone `k6-zone` (ZONE_RADIUS_M, default 10 km around the city centre)
//    and a temperature range `k6-range` (RANGE_MIN..RANGE_MAX, default 2..8 °C), both watching
//    every device; then post one reading of a "fence" device and look up its event's store
//    position: every alarm of this run comes after it.
// 2. scenario `devices`: DEVICES devices post one reading per second (as ingest.js). They stay
//    within 5 km of the centre at 3.5..6.5 °C, except a ROGUE_FRACTION of them (default 0.05,
//    spread evenly over the ids) which, after ROGUE_AFTER seconds (default 5), drift outwards by
//    ROGUE_DRIFT_M metres (default 2000) and warm up by 1 °C per second: each one leaves the zone
//    and overheats past RANGE_MAX within ~10 s, and stays out.
// 3. scenario `alarm_stream` (1 VU, concurrently): k6 has no SSE client, so it does one
//    GET /api/stream?types=alarms&since=<fence position>&limit=<n> where n = 2 x rogues
//    (ALARM_LIMIT overrides); the engine closes the stream after n events, so the GET returns
//    with the whole event stream as its body, which is parsed (`event:` and `data:` lines). If
//    the engine drops the stream early (a client too far behind), it resumes after the last
//    id. Every rogue must have raised exactly one LeftZone and one TemperatureOutOfRange, and
//    nobody else any alarm. If fewer than n alarms ever come, the GET times out after
//    DURATION + ALARM_GRACE_S (30 s) and the test fails.
// 4. teardown: GET /api/devices/{id} for every rogue (status must not be `normal`; it must be
//    outside `k6-zone` with an `above` alarm on `k6-range`) and for a sample of normal devices
//    (status `normal`).
//
// Device ids are `k6-alm-<run>-NNNNNN` with a per-run tag, so reruns against the same engine do
// not see the previous run's devices come back into the zone.

import http from 'k6/http';
import { check, sleep } from 'k6';
import { Counter, Rate, Trend } from 'k6/metrics';
import {
  BASE_URL,
  CITY,
  JSON_HEADERS,
  authHeaders,
  envFloat,
  envInt,
  loadSettings,
  readingScenario,
  readingThresholds,
  sendReadings,
  requireHealthy,
  roguePlan,
  rogueIndices,
  isRogue,
  deviceId,
  deviceIndex,
  MAX_RING_M,
} from './lib.js';

const S = loadSettings({ devices: 10000, duration: '60s', prefix: 'k6-alm' });
const ZONE_ID = 'k6-zone';
const RANGE_ID = 'k6-range';
const ZONE_RADIUS_M = envFloat('ZONE_RADIUS_M', 10000);
const RANGE_MIN = envFloat('RANGE_MIN', 2.0);
const RANGE_MAX = envFloat('RANGE_MAX', 8.0);
const ALARM_GRACE_S = envInt('ALARM_GRACE_S', 30);
const NORMAL_SAMPLE = envInt('NORMAL_SAMPLE', 100);

if (ZONE_RADIUS_M <= MAX_RING_M) {
  throw new Error(`ZONE_RADIUS_M must exceed ${MAX_RING_M} m, the normal devices' largest ring`);
}

const PLAN = roguePlan({
  devices: S.devices,
  fraction: envFloat('ROGUE_FRACTION', 0.05),
  zoneRadiusM: ZONE_RADIUS_M,
  afterRounds: envInt('ROGUE_AFTER', 5),
  driftMPerRound: envFloat('ROGUE_DRIFT_M', 2000),
  heatPerRound: 1.0,
  maxExtraM: 3000,
  maxTemp: RANGE_MAX + 10,
});
const ROGUES = rogueIndices(PLAN);
const EXPECTED_ALARMS = 2 * ROGUES.length;
const ALARM_LIMIT = envInt('ALARM_LIMIT', EXPECTED_ALARMS);
// The last rogue is outside the zone and above the range by this round.
const LAST_ALARM_ROUND =
  PLAN.afterRounds +
  Math.max(Math.ceil((ZONE_RADIUS_M - 500) / PLAN.driftMPerRound), Math.ceil(RANGE_MAX - 3.5)) +
  1;

const alarmsReceived = new Counter('alarms_received');
const alarmsLeftZone = new Counter('alarms_left_zone');
const alarmsTemperature = new Counter('alarms_temperature_out_of_range');
const alarmsUnexpected = new Counter('alarms_unexpected');
const alarmStreamComplete = new Rate('alarm_stream_complete');
const alarmStreamReconnects = new Counter('alarm_stream_reconnects');
const alarmLastDelivery = new Trend('alarm_last_delivery_ms', true);
const rogueNotNormal = new Rate('rogue_status_not_normal');
const rogueStateExpected = new Rate('rogue_state_as_expected');
const normalStillNormal = new Rate('normal_status_normal');

const streamTimeoutS = S.seconds + ALARM_GRACE_S;

export const options = {
  discardResponseBodies: true,
  setupTimeout: '60s',
  teardownTimeout: '120s',
  scenarios: {
    devices: readingScenario(S),
    alarm_stream: {
      executor: 'per-vu-iterations',
      exec: 'watchAlarms',
      vus: 1,
      iterations: 1,
      maxDuration: `${Math.ceil(streamTimeoutS + 30)}s`,
      gracefulStop: '10s',
      tags: { kind: 'sse' },
    },
  },
  thresholds: Object.assign(readingThresholds(S), {
    alarms_left_zone: ['count>0'],
    alarms_temperature_out_of_range: ['count>0'],
    alarms_unexpected: ['count==0'],
    alarm_stream_complete: ['rate==1'],
    rogue_status_not_normal: ['rate==1'],
    rogue_state_as_expected: ['rate==1'],
    normal_status_normal: ['rate==1'],
  }),
  summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
};

function putRule(path, body) {
  const res = http.put(`${BASE_URL}${path}`, JSON.stringify(body), {
    headers: authHeaders('admin', JSON_HEADERS),
    responseType: 'text',
    tags: { name: `PUT ${path.replace(/[^/]+$/, '{id}')}` },
  });
  const ok = check(res, { [`PUT ${path} is 200/201`]: (r) => r.status === 200 || r.status === 201 });
  if (!ok) throw new Error(`PUT ${path} failed: ${res.status} ${res.error || ''} ${res.body}`);
  let revision = 0;
  try {
    revision = Number(res.json('revision')) || 0;
  } catch (_) {
    revision = 0;
  }
  return revision;
}

export function setup() {
  requireHealthy();
  if (S.seconds < LAST_ALARM_ROUND + 2) {
    console.warn(`DURATION ${S.duration} is too short: the last rogue only raises its alarms in second ${LAST_ALARM_ROUND}`);
  }
  const zoneRevision = putRule(`/api/zones/${ZONE_ID}`, {
    id: ZONE_ID,
    name: 'k6: city zone',
    shape: { type: 'circle', center: { lat: CITY.lat, lon: CITY.lon }, radius_m: ZONE_RADIUS_M },
    devices: null,
  });
  const rangeRevision = putRule(`/api/temperature-ranges/${RANGE_ID}`, {
    id: RANGE_ID,
    name: 'k6: cold chain',
    min: RANGE_MIN,
    max: RANGE_MAX,
    devices: null,
  });
  const prefix = `${S.prefix}-${Date.now().toString(36)}`;
  const since = fencePosition(prefix);
  console.log(
    `alarms: ${S.devices} devices (${ROGUES.length} rogue) x 1 reading/s for ${S.duration} against ${BASE_URL}; ` +
      `device ids ${deviceId(prefix, 0)}..; expecting ${EXPECTED_ALARMS} alarms after position ${since} ` +
      `(zone revision ${zoneRevision}, range revision ${rangeRevision})`,
  );
  return { prefix, since };
}

/**
 * A store position after the rules were written: one reading of a "fence" device (at the city
 * centre, in range: it raises no alarm), whose first event's position is then looked up. The
 * alarm stream replays from there, so alarms of earlier runs or other devices do not count
 * towards its `limit`.
 */
function fencePosition(prefix) {
  const id = `${prefix}-fence`;
  const res = http.post(
    `${BASE_URL}/api/readings`,
    JSON.stringify({ device_id: id, timestamp: new Date().toISOString(), lat: CITY.lat, lon: CITY.lon, temperature: 5 }),
    { headers: authHeaders('ingest', JSON_HEADERS), tags: { name: 'POST /api/readings' } },
  );
  check(res, { 'fence reading is 202': (r) => r.status === 202 });
  const ev = http.get(`${BASE_URL}/api/devices/${id}/events?limit=1`, {
    headers: authHeaders('read'),
    responseType: 'text',
    tags: { name: 'GET /api/devices/{id}/events' },
  });
  let position = null;
  try {
    position = Number(ev.json('events.0.position'));
  } catch (_) {
    position = null;
  }
  const ok = check(ev, { 'fence event has a position': () => Number.isInteger(position) && position > 0 });
  if (!ok) throw new Error(`cannot find the store position of ${id}: ${ev.status} ${ev.body}`);
  return position;
}

let runSettings = null; // S with this run's device prefix, built once per VU

export function postReadings(data) {
  if (runSettings === null) runSettings = Object.assign({}, S, { prefix: data.prefix });
  sendReadings(runSettings, PLAN);
}

/** Splits an SSE body into events: [{event, id, data}] (comments and keep-alives skipped). */
export function parseSse(body) {
  const events = [];
  let cur = { event: 'message', id: null, data: [] };
  for (const line of String(body || '').split(/\r?\n/)) {
    if (line === '') {
      if (cur.data.length > 0) events.push({ event: cur.event, id: cur.id, data: cur.data.join('\n') });
      cur = { event: 'message', id: null, data: [] };
      continue;
    }
    if (line.startsWith(':')) continue;
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'event') cur.event = value;
    else if (field === 'data') cur.data.push(value);
    else if (field === 'id') cur.id = value;
  }
  if (cur.data.length > 0) events.push({ event: cur.event, id: cur.id, data: cur.data.join('\n') });
  return events;
}

export function watchAlarms(data) {
  // Counters get a zero sample so their thresholds are evaluated (and fail) even if nothing comes.
  alarmsLeftZone.add(0);
  alarmsTemperature.add(0);
  alarmsUnexpected.add(0);
  if (ALARM_LIMIT <= 0) {
    console.warn('no rogue devices (ROGUE_FRACTION too small): alarm stream not checked');
    return;
  }
  // The engine disconnects a client that falls too far behind the live feed; like any SSE client
  // this one then resumes after the last event id it got, asking only for the rest.
  const streamStartMs = Date.now();
  const deadline = streamStartMs + streamTimeoutS * 1000;
  const events = [];
  let since = data.since;
  let first = null;
  let res = null;
  for (let attempt = 0; events.length < ALARM_LIMIT && attempt < 50; attempt++) {
    const left = Math.floor((deadline - Date.now()) / 1000);
    if (left < 1) break;
    if (attempt > 0) {
      alarmStreamReconnects.add(1);
      console.warn(`alarm stream closed after ${events.length}/${ALARM_LIMIT} alarms; resuming after position ${since}`);
      sleep(0.2);
    }
    // k6 can send headers on the stream request: a bearer token, no ticket needed.
    res = http.get(`${BASE_URL}/api/stream?types=alarms&since=${since}&limit=${ALARM_LIMIT - events.length}`, {
      headers: authHeaders('read'),
      responseType: 'text',
      timeout: `${left}s`,
      tags: { name: 'GET /api/stream?types=alarms' },
    });
    if (first === null) first = res;
    for (const ev of parseSse(res.body)) {
      events.push(ev);
      const id = Number(ev.id);
      if (Number.isFinite(id) && id > since) since = id;
    }
    if (res.status !== 200) break; // timed out or refused: do not hammer
  }
  alarmStreamReconnects.add(0);
  const receivedAtMs = Date.now();
  if (res === null) {
    alarmStreamComplete.add(false);
    check(null, { 'alarm stream is 200': () => false });
    return;
  }

  const leftZone = new Set();
  const overheated = new Set();
  let unexpected = 0;
  let lastAtMs = 0;
  for (const ev of events) {
    let env = null;
    try {
      env = JSON.parse(ev.data);
    } catch (_) {
      env = null;
    }
    const stream = env && env.stream ? String(env.stream) : '';
    const index = deviceIndex(data.prefix, stream);
    if (index < 0) continue; // another client's devices: not ours to judge
    alarmsReceived.add(1, { type: ev.event });
    const d = (env && env.data) || {};
    const at = Date.parse(d.at);
    if (Number.isFinite(at) && at > lastAtMs) lastAtMs = at;
    const rogue = isRogue(PLAN, index);
    if (ev.event === 'LeftZone' && rogue && d.zone_id === ZONE_ID && !leftZone.has(index)) {
      leftZone.add(index);
      alarmsLeftZone.add(1);
    } else if (ev.event === 'TemperatureOutOfRange' && rogue && d.range_id === RANGE_ID && d.bound === 'above' && !overheated.has(index)) {
      overheated.add(index);
      alarmsTemperature.add(1);
    } else {
      unexpected++;
      if (unexpected <= 5) console.warn(`unexpected alarm: ${ev.event} ${ev.data}`);
    }
  }
  alarmsUnexpected.add(unexpected);
  // A reading's timestamp is the time k6 scheduled its request (see lib.js) and the stream
  // closes right after its last event, so this is how long after the reading that raised the
  // last alarm was due to be sent that alarm reached this client (k6's own lag included).
  if (lastAtMs > 0 && res.status === 200) alarmLastDelivery.add(receivedAtMs - lastAtMs);

  const complete = leftZone.size === ROGUES.length && overheated.size === ROGUES.length;
  alarmStreamComplete.add(complete);
  check(first, {
    'alarm stream is 200': (r) => r.status === 200,
    'alarm stream is text/event-stream': (r) => String(r.headers['Content-Type'] || '').startsWith('text/event-stream'),
    'alarm stream delivered limit events': () => events.length === ALARM_LIMIT,
    'every rogue raised LeftZone': () => leftZone.size === ROGUES.length,
    'every rogue raised TemperatureOutOfRange': () => overheated.size === ROGUES.length,
    'no unexpected alarms': () => unexpected === 0,
  });
  console.log(
    `alarm stream: status ${res.status} ${res.error || ''}, ${events.length} events ` +
      `after ${Math.round((receivedAtMs - streamStartMs) / 1000)} s; ` +
      `LeftZone ${leftZone.size}/${ROGUES.length}, TemperatureOutOfRange ${overheated.size}/${ROGUES.length}, unexpected ${unexpected}`,
  );
}

function getDevices(ids) {
  const reqs = ids.map((id) => ({
    method: 'GET',
    url: `${BASE_URL}/api/devices/${encodeURIComponent(id)}`,
    params: { headers: authHeaders('read'), responseType: 'text', tags: { name: 'GET /api/devices/{id}' } },
  }));
  const out = [];
  for (let i = 0; i < reqs.length; i += 50) {
    const batch = reqs.slice(i, i + 50);
    const responses = http.batch(batch);
    for (let j = 0; j < responses.length; j++) out.push({ id: ids[i + j], res: responses[j] });
  }
  return out;
}

function deviceBody(res) {
  try {
    return res.json();
  } catch (_) {
    return null;
  }
}

export function teardown(data) {
  let rogueBad = 0;
  for (const { id, res } of getDevices(ROGUES.map((i) => deviceId(data.prefix, i)))) {
    const dev = deviceBody(res);
    const notNormal = res.status === 200 && dev !== null && dev.status !== 'normal';
    const expected =
      notNormal &&
      dev.status === 'temperature_alarm' &&
      Array.isArray(dev.outside_zones) &&
      dev.outside_zones.includes(ZONE_ID) &&
      Array.isArray(dev.temperature_alarms) &&
      dev.temperature_alarms.some((a) => a.range_id === RANGE_ID && a.bound === 'above');
    rogueNotNormal.add(notNormal);
    rogueStateExpected.add(expected);
    check(res, { 'rogue device status is not normal': () => notNormal });
    if (!expected && ++rogueBad <= 5) console.warn(`rogue ${id}: ${res.status} ${res.body}`);
  }

  const normals = [];
  const step = Math.max(1, Math.floor(S.devices / Math.max(1, NORMAL_SAMPLE)));
  for (let i = 0; i < S.devices && normals.length < NORMAL_SAMPLE; i += step) {
    if (!isRogue(PLAN, i)) normals.push(deviceId(data.prefix, i));
  }
  let normalBad = 0;
  for (const { id, res } of getDevices(normals)) {
    const dev = deviceBody(res);
    const ok = res.status === 200 && dev !== null && dev.status === 'normal';
    normalStillNormal.add(ok);
    check(res, { 'normal device status is normal': () => ok });
    if (!ok && ++normalBad <= 5) console.warn(`normal ${id}: ${res.status} ${res.body}`);
  }
  console.log(
    `teardown: ${ROGUES.length - rogueBad}/${ROGUES.length} rogues alarmed as expected, ` +
      `${normals.length - normalBad}/${normals.length} sampled normal devices normal`,
  );
}

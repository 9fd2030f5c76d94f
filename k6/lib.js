// Shared pieces of the fleetwatch k6 scripts: settings from the environment, the virtual
// devices' deterministic paths and readings, and the constant-arrival-rate scenario that drives
// them. Every script imports from here, so ingest, alarms and soak load the engine the same way.
//
// A virtual device `i` circles the city centre on its own ring (radius 500..5000 m) at walking
// to cycling speed, and its temperature drifts gently inside 3.5..6.5 °C. A "rogue" device
// (alarms.js) additionally drifts away from the centre and heats up after ROGUE_AFTER seconds,
// so it leaves the watch zone and overheats past the temperature range's max.
//
// Timestamps are synthetic and strictly increasing per device: iteration n of the readings
// scenario (device n % DEVICES, round floor(n / DEVICES)) is stamped with the time the
// constant-arrival-rate executor schedules it, scenario start + n / rate seconds. So a device's
// readings are exactly one second apart, a request that happens to be sent late never makes a
// reading go backwards, and the reading's timestamp is (to within k6's scheduling lag) the time it
// was sent, which alarms.js uses to measure alarm delivery latency.

import http from 'k6/http';
import exec from 'k6/execution';
import { check } from 'k6';

// ---------------------------------------------------------------------------------------------
// Settings
// ---------------------------------------------------------------------------------------------

export function envString(name, fallback) {
  const v = __ENV[name];
  return v === undefined || v === '' ? fallback : v;
}

export function envInt(name, fallback) {
  const raw = __ENV[name];
  if (raw === undefined || raw === '') return fallback;
  const v = Number(raw);
  if (!Number.isInteger(v)) throw new Error(`${name} must be an integer, got "${raw}"`);
  return v;
}

export function envFloat(name, fallback) {
  const raw = __ENV[name];
  if (raw === undefined || raw === '') return fallback;
  const v = Number(raw);
  if (!Number.isFinite(v)) throw new Error(`${name} must be a number, got "${raw}"`);
  return v;
}

/** Parses a k6-style duration ("90s", "30m", "1h30m", "1500ms", or bare seconds) into seconds. */
export function durationSeconds(text) {
  const s = String(text).trim();
  if (/^\d+(\.\d+)?$/.test(s)) return Number(s);
  const re = /(\d+(?:\.\d+)?)(ms|h|m|s)/g;
  let total = 0;
  let consumed = 0;
  let m;
  while ((m = re.exec(s)) !== null) {
    const n = Number(m[1]);
    total += m[2] === 'h' ? n * 3600 : m[2] === 'm' ? n * 60 : m[2] === 's' ? n : n / 1000;
    consumed += m[0].length;
  }
  if (consumed !== s.length || consumed === 0) throw new Error(`not a duration: "${text}"`);
  return total;
}

export const BASE_URL = envString('BASE_URL', 'http://127.0.0.1:8080').replace(/\/+$/, '');

export const JSON_HEADERS = { 'Content-Type': 'application/json' };

/**
 * Bearer tokens for an engine that needs them (docs/api.md, "Access control"): FLEETWATCH_TOKEN
 * for every request, or one per scope (FLEETWATCH_INGEST_TOKEN, FLEETWATCH_ADMIN_TOKEN,
 * FLEETWATCH_READ_TOKEN), which win over it. None set: no Authorization header.
 */
const ANY_TOKEN = envString('FLEETWATCH_TOKEN', '');
export const TOKENS = {
  ingest: envString('FLEETWATCH_INGEST_TOKEN', ANY_TOKEN),
  admin: envString('FLEETWATCH_ADMIN_TOKEN', ANY_TOKEN),
  read: envString('FLEETWATCH_READ_TOKEN', ANY_TOKEN),
};

/** `headers` plus `Authorization: Bearer <token>` for `scope` ('ingest', 'admin', 'read') when set. */
export function authHeaders(scope, headers = {}) {
  const token = TOKENS[scope];
  return token ? { ...headers, Authorization: `Bearer ${token}` } : headers;
}

// ---------------------------------------------------------------------------------------------
// Virtual devices
// ---------------------------------------------------------------------------------------------

/** City the devices drive around (Amsterdam by default). */
export const CITY = {
  lat: envFloat('CITY_LAT', 52.3676),
  lon: envFloat('CITY_LON', 4.9041),
};

const METRES_PER_DEGREE_LAT = 111320;

/** Moves `centre` by `north_m` / `east_m` metres (equirectangular; fine at city scale). */
export function offset(centre, northM, eastM) {
  const lat = centre.lat + northM / METRES_PER_DEGREE_LAT;
  const lon = centre.lon + eastM / (METRES_PER_DEGREE_LAT * Math.cos((centre.lat * Math.PI) / 180));
  return { lat, lon };
}

/** A small integer hash (xorshift-multiply) so each device gets stable pseudo-random traits. */
function hash32(n) {
  let x = (n + 0x9e3779b9) | 0;
  x = Math.imul(x ^ (x >>> 16), 0x85ebca6b);
  x = Math.imul(x ^ (x >>> 13), 0xc2b2ae35);
  x ^= x >>> 16;
  return x >>> 0;
}

function unit(n, salt) {
  return hash32(n * 7919 + salt) / 4294967296; // [0, 1)
}

/** Device ids are `<prefix>-000042`: sortable, and valid per the API ([A-Za-z0-9._:-]). */
export function deviceId(prefix, index) {
  return `${prefix}-${String(index).padStart(6, '0')}`;
}

export function deviceIndex(prefix, id) {
  if (!id.startsWith(`${prefix}-`)) return -1;
  const n = Number(id.slice(prefix.length + 1));
  return Number.isInteger(n) ? n : -1;
}

/** Normal devices stay within this distance of the city centre. */
export const MAX_RING_M = 5000;
const MIN_RING_M = 500;

/**
 * The rogue plan (alarms.js): which devices misbehave, from which round on, and how fast.
 * `fraction` 0 means no rogues. Rogues are spread evenly over the index range
 * (index i is rogue when floor((i+1)*f) > floor(i*f)), so there are exactly floor(N*f) of them.
 */
export function roguePlan({
  devices,
  fraction = 0,
  zoneRadiusM = 10000,
  afterRounds = 5,
  driftMPerRound = 2000,
  heatPerRound = 1.0,
  maxExtraM = 3000,
  maxTemp = 20,
}) {
  return { devices, fraction, zoneRadiusM, afterRounds, driftMPerRound, heatPerRound, maxExtraM, maxTemp };
}

export function isRogue(plan, index) {
  if (!plan || plan.fraction <= 0) return false;
  const f = plan.fraction;
  return Math.floor((index + 1) * f) > Math.floor(index * f);
}

export function rogueIndices(plan) {
  const out = [];
  for (let i = 0; i < plan.devices; i++) if (isRogue(plan, i)) out.push(i);
  return out;
}

/**
 * The reading device `index` sends in `round` (0, 1, 2, ...), stamped `timestampMs`.
 * Pure function of its arguments: every VU computes the same path for a device.
 */
export function reading(prefix, index, round, timestampMs, plan) {
  const ring = MIN_RING_M + unit(index, 1) * (MAX_RING_M - MIN_RING_M);
  const speed = 3 + unit(index, 2) * 9; // 3..12 m/s along the ring
  const phase = unit(index, 3) * 2 * Math.PI;
  const angle = phase + (speed / ring) * round * (unit(index, 4) < 0.5 ? 1 : -1);

  let radius = ring;
  let temperature = 5 + 1.5 * Math.sin(unit(index, 5) * 2 * Math.PI + round / 90);

  if (plan && isRogue(plan, index) && round > plan.afterRounds) {
    const k = round - plan.afterRounds;
    radius = Math.min(ring + k * plan.driftMPerRound, plan.zoneRadiusM + plan.maxExtraM);
    temperature = Math.min(temperature + k * plan.heatPerRound, plan.maxTemp);
  }

  const pos = offset(CITY, radius * Math.cos(angle), radius * Math.sin(angle));
  return {
    device_id: deviceId(prefix, index),
    timestamp: new Date(timestampMs).toISOString(),
    lat: round6(pos.lat),
    lon: round6(pos.lon),
    temperature: Math.round(temperature * 100) / 100,
  };
}

function round6(x) {
  return Math.round(x * 1e6) / 1e6;
}

// ---------------------------------------------------------------------------------------------
// Load shape: every device reports once per second
// ---------------------------------------------------------------------------------------------

/**
 * Settings shared by the reading scenarios. With BATCH=b > 1 an iteration posts one JSON array
 * with the readings of b consecutive devices, so the request rate is ceil(DEVICES / b) per second
 * while the reading rate stays DEVICES per second.
 */
export function loadSettings(defaults) {
  const devices = envInt('DEVICES', defaults.devices);
  const duration = envString('DURATION', defaults.duration);
  const batch = Math.max(1, envInt('BATCH', 1));
  const groups = Math.ceil(devices / batch); // requests per round
  if (devices < 1) throw new Error('DEVICES must be >= 1');
  const seconds = durationSeconds(duration);
  const expectedIterations = Math.floor(groups * seconds);
  return {
    devices,
    duration,
    seconds,
    batch,
    groups,
    prefix: envString('DEVICE_PREFIX', defaults.prefix),
    p95Ms: envInt('P95_MS', 200),
    // VUs needed = request rate x latency. Enough for 0.3 s of latency are started up front (a
    // VU costs ~0.25 MB): k6 drops the iterations that find no idle VU while it is still
    // starting more, and the dropped_iterations threshold counts those, since the offered load
    // was then lower than claimed. Up to 1 s of latency (or MAX_VUS) is covered on demand.
    preAllocatedVUs: envInt('PRE_VUS', Math.max(50, Math.ceil(groups * 0.3))),
    maxVUs: envInt('MAX_VUS', Math.max(100, groups)),
    // A short stall at the start (cold caches, VUs still being started) may drop a few
    // iterations of a small run: 0.1% of the planned iterations, at least 10.
    maxDropped: envInt('MAX_DROPPED', Math.max(10, Math.floor(expectedIterations * 0.001))),
    expectedIterations,
  };
}

/** The constant-arrival-rate scenario: `groups` iterations per second for `duration`. */
export function readingScenario(s, exec = 'postReadings') {
  return {
    executor: 'constant-arrival-rate',
    exec,
    rate: s.groups,
    timeUnit: '1s',
    duration: s.duration,
    preAllocatedVUs: Math.min(s.preAllocatedVUs, s.maxVUs),
    maxVUs: s.maxVUs,
    gracefulStop: '30s',
    tags: { kind: 'readings' },
  };
}

/** Thresholds every reading test shares; `scenario` names the reading scenario. */
export function readingThresholds(s, scenario = 'devices') {
  return {
    http_req_failed: ['rate==0'],
    [`http_req_duration{scenario:${scenario}}`]: [`p(95)<${s.p95Ms}`],
    checks: ['rate==1'],
    dropped_iterations: [`count<=${s.maxDropped}`],
  };
}

/**
 * Posts the readings of the current iteration of the readings scenario: the device group is the
 * iteration index (exec.scenario.iterationInTest) modulo the number of groups, the round is how
 * many full passes came before it, the timestamp the iteration's scheduled start.
 */
export function sendReadings(s, plan) {
  const n = exec.scenario.iterationInTest;
  const group = n % s.groups;
  const round = Math.floor(n / s.groups);
  const timestampMs = exec.scenario.startTime + Math.floor((n * 1000) / s.groups);
  let body;
  let count;
  if (s.batch === 1) {
    body = JSON.stringify(reading(s.prefix, group, round, timestampMs, plan));
    count = 1;
  } else {
    const first = group * s.batch;
    const last = Math.min(s.devices, first + s.batch);
    const items = [];
    for (let i = first; i < last; i++) items.push(reading(s.prefix, i, round, timestampMs, plan));
    body = JSON.stringify(items);
    count = items.length;
  }
  const res = http.post(`${BASE_URL}/api/readings`, body, {
    headers: authHeaders('ingest', JSON_HEADERS),
    tags: { name: 'POST /api/readings' },
  });
  check(res, { 'status is 202': (r) => r.status === 202 });
  return { res, count, round };
}

/** GET /api/health; true when the engine answers 200 with status and store "ok". */
export function checkHealth() {
  const res = http.get(`${BASE_URL}/api/health`, {
    tags: { name: 'GET /api/health' },
    responseType: 'text',
  });
  let body = null;
  try {
    body = res.json();
  } catch (_) {
    body = null;
  }
  const ok = check(res, {
    'health is 200': (r) => r.status === 200,
    'health status ok': () => body !== null && body.status === 'ok',
    'health store ok': () => body !== null && body.store === 'ok',
  });
  return { ok, res, body };
}

/** Fails setup early, with the engine's answer, when the engine is not reachable. */
export function requireHealthy() {
  const { ok, res } = checkHealth();
  if (!ok) {
    throw new Error(`engine at ${BASE_URL} is not healthy: status ${res.status} ${res.error || ''} ${res.body || ''}`);
  }
}

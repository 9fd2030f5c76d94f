// Soak test: fewer devices for much longer, to find leaks, slow growth in latency, store
// compaction stalls and the like.
//
//   k6 run k6/soak.js -e DEVICES=2000 -e DURATION=30m
//
// DEVICES (default 2000) devices post one reading per second for DURATION (default 30m), with
// the same thresholds as ingest.js (no failed requests, p95 < P95_MS, every answer 202). A second
// scenario GETs /api/health every HEALTH_EVERY (default 10s); every answer must be 200 with
// status and store "ok", and the active device count is recorded (gauge `devices_active`).
// Other settings as in ingest.js (BATCH, PRE_VUS, MAX_VUS, MAX_DROPPED, DEVICE_PREFIX=k6-soak).

import { Gauge, Rate, Trend } from 'k6/metrics';
import { envString, loadSettings, readingScenario, readingThresholds, sendReadings, requireHealthy, checkHealth, BASE_URL } from './lib.js';

const S = loadSettings({ devices: 2000, duration: '30m', prefix: 'k6-soak' });
const HEALTH_EVERY = envString('HEALTH_EVERY', '10s');

const healthOk = new Rate('health_ok');
const healthDuration = new Trend('health_duration', true);
const devicesActive = new Gauge('devices_active');

export const options = {
  discardResponseBodies: true,
  scenarios: {
    devices: readingScenario(S),
    health: {
      executor: 'constant-arrival-rate',
      exec: 'health',
      rate: 1,
      timeUnit: HEALTH_EVERY,
      duration: S.duration,
      preAllocatedVUs: 2,
      maxVUs: 5,
      gracefulStop: '10s',
      tags: { kind: 'health' },
    },
  },
  thresholds: Object.assign(readingThresholds(S), {
    health_ok: ['rate==1'],
    health_duration: [`p(95)<${S.p95Ms}`],
  }),
  summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
};

export function setup() {
  requireHealthy();
  console.log(`soak: ${S.devices} devices x 1 reading/s for ${S.duration} against ${BASE_URL}, health every ${HEALTH_EVERY}`);
}

export function postReadings() {
  sendReadings(S, null);
}

export function health() {
  const { ok, res, body } = checkHealth();
  healthOk.add(ok);
  healthDuration.add(res.timings.duration);
  if (body !== null && Number.isFinite(body.devices_active)) devicesActive.add(body.devices_active);
  if (!ok) console.warn(`health: ${res.status} ${res.error || ''} ${res.body}`);
}

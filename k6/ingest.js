// Ingest stress test: DEVICES virtual devices (default 10000) each POST one reading per second
// to /api/readings for DURATION (default 60s).
//
//   k6 run k6/ingest.js -e DEVICES=10000 -e DURATION=60s [-e BASE_URL=http://127.0.0.1:8080]
//
// Optional: BATCH=b posts arrays of b readings (DEVICES/b requests per second, same readings per
// second); P95_MS (default 200) the p95 latency bound; PRE_VUS / MAX_VUS; MAX_DROPPED (default
// 0.1% of the planned iterations, at least 10); DEVICE_PREFIX (default k6-ing).
//
// The constant-arrival-rate executor starts DEVICES/BATCH iterations per second whatever the
// latency, so a slow engine shows up as latency (and, past MAX_VUS, as dropped iterations) rather
// than as a quietly lower load. Iteration n posts for device n % DEVICES in round
// floor(n / DEVICES): each device's timestamps increase by exactly one second per round.

import { Counter } from 'k6/metrics';
import { loadSettings, readingScenario, readingThresholds, sendReadings, requireHealthy, BASE_URL } from './lib.js';

const S = loadSettings({ devices: 10000, duration: '60s', prefix: 'k6-ing' });

const readingsSent = new Counter('readings_sent');
const readingsAcked = new Counter('readings_acked'); // readings in 202 answers

const DEVICES_SCENARIO = readingScenario(S);

export const options = {
  discardResponseBodies: true,
  scenarios: {
    devices: DEVICES_SCENARIO,
  },
  thresholds: readingThresholds(S),
  summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
};

export function setup() {
  requireHealthy();
  console.log(
    `ingest: ${S.devices} devices x 1 reading/s for ${S.duration} against ${BASE_URL} ` +
      `(batch ${S.batch}: ${S.groups} requests/s, VUs ${DEVICES_SCENARIO.preAllocatedVUs}..${S.maxVUs})`,
  );
}

export function postReadings() {
  const { res, count } = sendReadings(S, null);
  readingsSent.add(count);
  readingsAcked.add(res.status === 202 ? count : 0);
}

// k6 steady-load test for ingest-gateway: single location updates at a fixed arrival rate (open model), judged on error rate and p99 latency.
//
//   k6 run loadtest/steady.js                                   # 2000 req/s for 1 min against http://127.0.0.1:8080
//   RATE=500 DURATION=5m P99_MS=20 k6 run loadtest/steady.js
//   BASE_URL=http://10.0.0.5:8080 HTML_REPORT=steady.html k6 run loadtest/steady.js
//
// k6 starts RATE requests every second whether or not earlier ones have been answered (constant-arrival-rate),
// the way a large fleet of independent devices behaves. If the gateway slows down, k6 needs more VUs to keep the
// rate; when MAX_VUS are all busy it skips iterations and counts them in `dropped_iterations`.
//
// Settings (environment): BASE_URL, RATE (requests/s, 2000), DURATION (1m), PRE_VUS (50), MAX_VUS (500),
// P99_MS (50), HTML_REPORT (path of an HTML report to write).
import http from 'k6/http';
import { check } from 'k6';
import exec from 'k6/execution';
import { summarize, TREND_STATS } from './lib/summary.js';
import { accepted, startRun } from './lib/gateway.js';

const BASE_URL = (__ENV.BASE_URL || 'http://127.0.0.1:8080').replace(/\/+$/, '');
const RATE = Number(__ENV.RATE || 2000);
const DURATION = __ENV.DURATION || '1m';
const PRE_VUS = Number(__ENV.PRE_VUS || 50);
const MAX_VUS = Math.max(PRE_VUS, Number(__ENV.MAX_VUS || 500));
const P99_MS = Number(__ENV.P99_MS || 50);
const JSON_HEADERS = { 'Content-Type': 'application/json' };

export const options = {
  scenarios: {
    steady: {
      executor: 'constant-arrival-rate',
      rate: RATE,
      timeUnit: '1s',
      duration: DURATION,
      preAllocatedVUs: PRE_VUS,
      maxVUs: MAX_VUS,
    },
  },
  thresholds: {
    http_req_failed: ['rate<0.001'],
    checks: ['rate>0.999'],
    http_req_duration: [`p(99)<${P99_MS}`],
  },
  summaryTrendStats: TREND_STATS,
};

// Runs once; its result reaches every VU, so all VUs share one run id (a base-36 timestamp plus a random suffix).
export function setup() {
  return startRun(BASE_URL);
}


export default function (data) {
  // Unique per run, VU and iteration: no update repeats an earlier (device_id, recorded_at).
  const deviceId = `k6-steady-${data.runId}-v${exec.vu.idInTest}-i${exec.vu.iterationInScenario}`;
  const update = {
    device_id: deviceId,
    recorded_at: new Date().toISOString(),
    lat: 48.8566 + (Math.random() - 0.5) * 0.5,
    lon: 2.3522 + (Math.random() - 0.5) * 0.5,
    speed_kmh: Math.round(Math.random() * 1300) / 10,
    heading_deg: Math.floor(Math.random() * 3600) / 10,
    accuracy_m: 2 + Math.round(Math.random() * 25),
  };
  const res = http.post(`${BASE_URL}/api/v1/location/update`, JSON.stringify(update), {
    headers: JSON_HEADERS,
    tags: { name: 'location_single' },
  });
  check(res, {
    'status 202': (r) => r.status === 202,
    'accepted == 1': (r) => accepted(r) === 1,
  });
}

export function handleSummary(data) {
  return summarize(data, {
    title: 'ingest-gateway: steady single location updates',
    description: `constant-arrival-rate (open model) against ${BASE_URL}/api/v1/location/update`,
    params: { RATE: `${RATE}/s`, DURATION: DURATION, PRE_VUS: PRE_VUS, MAX_VUS: MAX_VUS, P99_MS: P99_MS },
  });
}

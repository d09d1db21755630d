// k6 ramp test for ingest-gateway: 50 to 500 VUs posting location updates (closed model), held, then ramped down; every answer must be 202 and p99 under 50 ms.
//
//   k6 run loadtest/ramp.js                                     # 10 min against http://127.0.0.1:8080
//   STAGES_SCALE=0.05 k6 run loadtest/ramp.js                   # the same shape in 30 s, for a quick try
//   BASE_URL=http://10.0.0.5:8080 HTML_REPORT=ramp.html k6 run loadtest/ramp.js
//
// Stages: 4 min from START_VUS (50) up to PEAK_VUS (500), 4 min at PEAK_VUS, 2 min down to 0; STAGES_SCALE
// multiplies every duration. Each VU is one device: it posts one fix, every 10th time a 100-fix array, then
// sleeps 0.5-1.5 s. Each VU waits for its answer before going on (closed model), so 500 VUs make roughly
// 350-500 requests/s, fewer if the gateway slows down.
//
// Settings (environment): BASE_URL, STAGES_SCALE (1), START_VUS (50), PEAK_VUS (500), P99_MS (50),
// HTML_REPORT (path of an HTML report to write).
import http from 'k6/http';
import { check, sleep } from 'k6';
import exec from 'k6/execution';
import { Counter } from 'k6/metrics';
import { latencyByName, summarize, TREND_STATS } from './lib/summary.js';
import { accepted, startRun } from './lib/gateway.js';

const BASE_URL = (__ENV.BASE_URL || 'http://127.0.0.1:8080').replace(/\/+$/, '');
const SCALE = Number(__ENV.STAGES_SCALE || 1);
const START_VUS = Number(__ENV.START_VUS || 50);
const PEAK_VUS = Number(__ENV.PEAK_VUS || 500);
const P99_MS = Number(__ENV.P99_MS || 50);
const BATCH = 100;
const JSON_HEADERS = { 'Content-Type': 'application/json' };
// Updates the gateway answered 202 for: after the run, the table must hold at least this many of the run's rows.
const updatesAccepted = new Counter('updates_accepted');

if (!(SCALE > 0)) {
  throw new Error(`STAGES_SCALE must be a number above 0, not ${__ENV.STAGES_SCALE}`);
}

// A stage duration in whole seconds (at least 1), scaled.
function scaled(seconds) {
  return `${Math.max(1, Math.round(seconds * SCALE))}s`;
}

const STAGES = [
  { duration: scaled(240), target: PEAK_VUS },
  { duration: scaled(240), target: PEAK_VUS },
  { duration: scaled(120), target: 0 },
];

export const options = {
  scenarios: {
    ramp: {
      executor: 'ramping-vus',
      startVUs: START_VUS,
      stages: STAGES,
      gracefulRampDown: '5s',
    },
  },
  thresholds: Object.assign(
    {
      checks: ['rate==1.0'],
      http_req_duration: [`p(99)<${P99_MS}`],
    },
    latencyByName(['location_single', `location_batch${BATCH}`]), // report each kind's latency too
  ),
  summaryTrendStats: TREND_STATS,
};

// Runs once; its result reaches every VU, so all VUs share one run id (a base-36 timestamp plus a random suffix).
export function setup() {
  return startRun(BASE_URL);
}


function fix(deviceId, recordedAt) {
  return {
    device_id: deviceId,
    recorded_at: recordedAt,
    lat: 40.4168 + (Math.random() - 0.5) * 0.4,
    lon: -3.7038 + (Math.random() - 0.5) * 0.4,
    speed_kmh: Math.round(Math.random() * 1100) / 10,
    heading_deg: Math.floor(Math.random() * 3600) / 10,
    accuracy_m: 3 + Math.round(Math.random() * 20),
  };
}

export default function (data) {
  const iter = exec.vu.iterationInScenario;
  // Unique per run, VU and iteration: no update repeats an earlier (device_id, recorded_at).
  const deviceId = `k6-ramp-${data.runId}-v${exec.vu.idInTest}-i${iter}`;
  let body;
  let n;
  let name;
  if (iter % 10 === 9) {
    // Every 10th time: the fixes buffered over the last 100 s, one a second, oldest first.
    const now = Date.now();
    body = [];
    for (let i = BATCH - 1; i >= 0; i--) {
      body.push(fix(deviceId, new Date(now - i * 1000).toISOString()));
    }
    n = BATCH;
    name = `location_batch${BATCH}`;
  } else {
    body = fix(deviceId, new Date().toISOString());
    n = 1;
    name = 'location_single';
  }
  const res = http.post(`${BASE_URL}/api/v1/location/update`, JSON.stringify(body), {
    headers: JSON_HEADERS,
    tags: { name: name },
  });
  check(res, {
    'status 202': (r) => r.status === 202,
    'accepted == number sent': (r) => accepted(r) === n,
  });
  if (res.status === 202) {
    updatesAccepted.add(accepted(res) || 0);
  }
  sleep(0.5 + Math.random());
}

export function handleSummary(data) {
  return summarize(data, {
    title: `ingest-gateway: ramp ${START_VUS} → ${PEAK_VUS} VUs`,
    description: `ramping-vus (closed model) against ${BASE_URL}/api/v1/location/update`,
    params: {
      STAGES: STAGES.map((s) => `${s.duration}→${s.target}`).join(', '),
      STAGES_SCALE: SCALE,
      START_VUS: START_VUS,
      PEAK_VUS: PEAK_VUS,
      P99_MS: P99_MS,
    },
  });
}

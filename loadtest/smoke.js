// k6 smoke test for ingest-gateway: posts single and 100-update location requests and single poll results, and checks each is answered 202 with the right "accepted" count.
//
//   k6 run loadtest/smoke.js                                  # against http://127.0.0.1:8080
//   BASE_URL=http://127.0.0.1:9000 VUS=2 DURATION=30s k6 run loadtest/smoke.js
//
// Every update carries a fresh timestamp and a device id unique to the run, VU, iteration and position, so that
// nothing is a duplicate of an earlier row. Any non-202 answer (422, 503, ...) fails the run.
import http from 'k6/http';
import { check, sleep } from 'k6';
import exec from 'k6/execution';
import { latencyByName, summarize, TREND_STATS } from './lib/summary.js';
import { accepted, startRun } from './lib/gateway.js';

const BASE_URL = (__ENV.BASE_URL || 'http://127.0.0.1:8080').replace(/\/+$/, '');
const BATCH = 100;
const JSON_HEADERS = { 'Content-Type': 'application/json' };

export const options = {
  scenarios: {
    smoke: {
      executor: 'constant-vus',
      vus: Number(__ENV.VUS || 5),
      duration: __ENV.DURATION || '10s',
    },
  },
  thresholds: Object.assign(
    {
      checks: ['rate==1.0'],
      http_req_failed: ['rate<0.01'],
    },
    latencyByName(['location_single', 'location_batch100', 'poll_single']), // report each kind's latency too
  ),
  summaryTrendStats: TREND_STATS,
};

// Runs once; its result reaches every VU, so all VUs share one run id.
export function setup() {
  return startRun(BASE_URL);
}


function expectAccepted(res, what, n) {
  return check(res, {
    [`${what}: status 202`]: (r) => r.status === 202,
    [`${what}: accepted == ${n}`]: (r) => accepted(r) === n,
  });
}

function location(deviceId, recordedAt) {
  return {
    device_id: deviceId,
    recorded_at: recordedAt,
    lat: 52.52 + (Math.random() - 0.5) * 0.2,
    lon: 13.405 + (Math.random() - 0.5) * 0.2,
    speed_kmh: Math.round(Math.random() * 1200) / 10,
    heading_deg: Math.floor(Math.random() * 3600) / 10,
    accuracy_m: 3 + Math.round(Math.random() * 20),
    source: 'k6-smoke',
  };
}

export default function (data) {
  const vu = exec.vu.idInTest;
  const iter = exec.vu.iterationInScenario;
  const prefix = `k6-${data.runId}-v${vu}-i${iter}`;

  // One location update as a JSON object, RFC 3339 timestamp.
  let res = http.post(
    `${BASE_URL}/api/v1/location/update`,
    JSON.stringify(location(`${prefix}-single`, new Date().toISOString())),
    { headers: JSON_HEADERS, tags: { name: 'location_single' } },
  );
  expectAccepted(res, 'location single', 1);

  // A burst after a dead zone: a JSON array of 100 fixes, one per second back in time,
  // alternating RFC 3339 strings and integer Unix milliseconds.
  const now = Date.now();
  const updates = [];
  for (let i = 0; i < BATCH; i++) {
    const t = now - i * 1000;
    updates.push(location(`${prefix}-b${i}`, i % 2 === 0 ? new Date(t).toISOString() : t));
  }
  res = http.post(`${BASE_URL}/api/v1/location/update`, JSON.stringify(updates), {
    headers: JSON_HEADERS,
    tags: { name: 'location_batch100' },
  });
  expectAccepted(res, `location array of ${BATCH}`, BATCH);

  // One poll result; every fifth one is a failed poll.
  const ok = iter % 5 !== 4;
  const poll = {
    project_id: vu,
    polled_at: new Date().toISOString(),
    success: ok,
    status_code: ok ? 200 : 503,
    response_time_ms: Math.floor(Math.random() * 2000),
    target: `https://example.com/slots/${vu}`,
    run: data.runId,
    iteration: iter,
  };
  if (!ok) {
    poll.error_message = 'upstream answered 503 Service Unavailable';
  }
  res = http.post(`${BASE_URL}/api/v1/poll/update`, JSON.stringify(poll), {
    headers: JSON_HEADERS,
    tags: { name: 'poll_single' },
  });
  expectAccepted(res, 'poll single', 1);

  sleep(0.1);
}

// Text summary on stdout; with HTML_REPORT=<path>, an HTML report too.
export function handleSummary(data) {
  return summarize(data, {
    title: 'ingest-gateway: smoke test',
    description: `single and 100-update location requests and single poll results against ${BASE_URL}`,
    params: { VUS: Number(__ENV.VUS || 5), DURATION: __ENV.DURATION || '10s' },
  });
}

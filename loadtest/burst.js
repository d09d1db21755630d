// k6 burst test for ingest-gateway: a fleet reconnecting after a dead zone, every VU posting 1000-update backlogs at once; 503 with Retry-After is a legitimate answer.
//
//   k6 run loadtest/burst.js                                    # 50 VUs x 4 arrays of 1000 against http://127.0.0.1:8080
//   VUS=200 ITERATIONS=10 k6 run loadtest/burst.js
//   BASE_URL=http://10.0.0.5:8080 HTML_REPORT=burst.html k6 run loadtest/burst.js
//
// Each VU is a truck that comes out of a dead zone with a backlog of fixes recorded over the last BACKLOG_MIN
// minutes and posts it as one JSON array, then the next truck's, with no pause: all VUs start together, so the
// gateway's queue sees 50 x 1000 updates arrive within a moment. A full queue answers 503 with `Retry-After`;
// that is counted in `overloaded_503` and accepted as correct, as long as at least 95 % of the requests got 202.
//
// Settings (environment): BASE_URL, VUS (50), ITERATIONS (arrays per VU, 4), BATCH (updates per array, 1000),
// BACKLOG_MIN (minutes the backlog spans, 5), MAX_DURATION (2m), HTML_REPORT (path of an HTML report to write).
import http from 'k6/http';
import { check } from 'k6';
import exec from 'k6/execution';
import { Counter, Rate } from 'k6/metrics';
import { summarize, TREND_STATS } from './lib/summary.js';
import { accepted, startRun } from './lib/gateway.js';

const BASE_URL = (__ENV.BASE_URL || 'http://127.0.0.1:8080').replace(/\/+$/, '');
const VUS = Number(__ENV.VUS || 50);
const ITERATIONS = Number(__ENV.ITERATIONS || 4);
const BATCH = Number(__ENV.BATCH || 1000);
const BACKLOG_MIN = Number(__ENV.BACKLOG_MIN || 5);
const MAX_DURATION = __ENV.MAX_DURATION || '2m';
const JSON_HEADERS = { 'Content-Type': 'application/json' };
const EXPECTED = http.expectedStatuses(202, 503);

// Requests refused with 503 because the queue had no room for the whole array.
const overloaded = new Counter('overloaded_503');
// Share of requests answered 202.
const acceptedRate = new Rate('accepted_rate');
// Updates the gateway accepted (sum of "accepted" over all 202 answers).
const updatesAccepted = new Counter('updates_accepted');

export const options = {
  scenarios: {
    burst: {
      executor: 'per-vu-iterations',
      vus: VUS,
      iterations: ITERATIONS,
      maxDuration: MAX_DURATION,
    },
  },
  thresholds: {
    checks: ['rate==1.0'],
    accepted_rate: ['rate>=0.95'],
  },
  summaryTrendStats: TREND_STATS,
};

// Runs once; its result reaches every VU, so all VUs share one run id (a base-36 timestamp plus a random suffix).
export function setup() {
  return startRun(BASE_URL);
}


function header(res, name) {
  const wanted = name.toLowerCase();
  for (const k of Object.keys(res.headers)) {
    if (k.toLowerCase() === wanted) return res.headers[k];
  }
  return undefined;
}

// One truck's backlog: BATCH fixes, oldest first, evenly spread over the last BACKLOG_MIN minutes along a short
// drive; every third timestamp is integer Unix milliseconds, the others RFC 3339.
function backlog(deviceId) {
  const now = Date.now();
  const spanMs = BACKLOG_MIN * 60 * 1000;
  const stepMs = Math.max(1, Math.floor(spanMs / BATCH));
  let lat = 45.764 + (Math.random() - 0.5);
  let lon = 4.8357 + (Math.random() - 0.5);
  let heading = Math.random() * 360;
  const updates = [];
  for (let i = 0; i < BATCH; i++) {
    const t = now - (BATCH - 1 - i) * stepMs;
    heading = (heading + (Math.random() - 0.5) * 20 + 360) % 360;
    lat += Math.cos((heading * Math.PI) / 180) * 0.00005;
    lon += Math.sin((heading * Math.PI) / 180) * 0.00007;
    updates.push({
      device_id: deviceId,
      recorded_at: i % 3 === 0 ? t : new Date(t).toISOString(),
      lat: lat,
      lon: lon,
      speed_kmh: Math.round(Math.random() * 900) / 10,
      heading_deg: Math.floor(heading * 10) / 10,
      accuracy_m: 3 + Math.round(Math.random() * 40),
    });
  }
  return updates;
}

export default function (data) {
  // Unique per run, VU and iteration; timestamps differ within the array, so no (device_id, recorded_at) repeats.
  const deviceId = `k6-burst-${data.runId}-v${exec.vu.idInTest}-i${exec.vu.iterationInScenario}`;
  const res = http.post(`${BASE_URL}/api/v1/location/update`, JSON.stringify(backlog(deviceId)), {
    headers: JSON_HEADERS,
    tags: { name: `location_batch${BATCH}` },
    // 503 is an expected answer here, so it does not count in http_req_failed; anything else but 202 does.
    responseCallback: EXPECTED,
  });

  const ok = res.status === 202;
  acceptedRate.add(ok);
  if (res.status === 503) {
    overloaded.add(1);
  }
  check(res, {
    'answered 202, or 503 with Retry-After': (r) =>
      r.status === 202 || (r.status === 503 && /^\d+$/.test(String(header(r, 'Retry-After') || '').trim())),
  });
  if (ok) {
    const n = accepted(res);
    check(res, { [`202: accepted == ${BATCH}`]: () => n === BATCH });
    if (typeof n === 'number') updatesAccepted.add(n);
  }
}

export function handleSummary(data) {
  return summarize(data, {
    title: 'ingest-gateway: burst of dead-zone backlogs',
    description: `per-vu-iterations: every VU posts ${BATCH}-update arrays to ${BASE_URL}/api/v1/location/update`,
    params: { VUS: VUS, ITERATIONS: ITERATIONS, BATCH: BATCH, BACKLOG_MIN: BACKLOG_MIN },
  });
}

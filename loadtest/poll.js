// k6 poll-results test for ingest-gateway: single poll results and arrays of 10 at a fixed arrival rate, with a realistic mix of successes, HTTP errors and timeouts.
//
//   k6 run loadtest/poll.js                                     # 1000 req/s for 1 min against http://127.0.0.1:8080
//   RATE=300 DURATION=5m ARRAY_SHARE=0.5 k6 run loadtest/poll.js
//   BASE_URL=http://10.0.0.5:8080 HTML_REPORT=poll.html k6 run loadtest/poll.js
//
// Pollers (uptime checkers, API watchers) watch projects 1..1000 and report each poll: most succeed (200, some
// 204/301/304), some get an HTTP error (404, 429, 5xx), some time out or cannot connect (no status code, an
// error message). ARRAY_SHARE of the requests are a poller flushing 10 results at once, for 10 different projects.
// Arrival rate is fixed (open model), as in steady.js.
//
// Settings (environment): BASE_URL, RATE (requests/s, 1000), DURATION (1m), ARRAY_SHARE (0.2), PRE_VUS (50),
// MAX_VUS (500), P99_MS (50), HTML_REPORT (path of an HTML report to write).
import http from 'k6/http';
import { check } from 'k6';
import exec from 'k6/execution';
import { Counter } from 'k6/metrics';
import { latencyByName, summarize, TREND_STATS } from './lib/summary.js';
import { accepted, startRun } from './lib/gateway.js';

const BASE_URL = (__ENV.BASE_URL || 'http://127.0.0.1:8080').replace(/\/+$/, '');
const RATE = Number(__ENV.RATE || 1000);
const DURATION = __ENV.DURATION || '1m';
const ARRAY_SHARE = Number(__ENV.ARRAY_SHARE !== undefined ? __ENV.ARRAY_SHARE : 0.2);
const PRE_VUS = Number(__ENV.PRE_VUS || 50);
const MAX_VUS = Math.max(PRE_VUS, Number(__ENV.MAX_VUS || 500));
const P99_MS = Number(__ENV.P99_MS || 50);
const ARRAY_SIZE = 10;
const PROJECTS = 1000;
const JSON_HEADERS = { 'Content-Type': 'application/json' };

// Poll results sent, by outcome: they land in poll_results with success true / false.
const pollsOk = new Counter('polls_success');
const pollsFailed = new Counter('polls_failure');

export const options = {
  scenarios: {
    poll: {
      executor: 'constant-arrival-rate',
      rate: RATE,
      timeUnit: '1s',
      duration: DURATION,
      preAllocatedVUs: PRE_VUS,
      maxVUs: MAX_VUS,
    },
  },
  thresholds: Object.assign(
    {
      http_req_failed: ['rate<0.001'],
      checks: ['rate>0.999'],
      http_req_duration: [`p(99)<${P99_MS}`],
    },
    latencyByName(['poll_single', `poll_batch${ARRAY_SIZE}`]), // report each kind's latency too
  ),
  summaryTrendStats: TREND_STATS,
};

// Runs once; its result reaches every VU, so all VUs share one run id (a base-36 timestamp plus a random suffix).
export function setup() {
  return startRun(BASE_URL);
}


function pick(list) {
  return list[Math.floor(Math.random() * list.length)];
}

// A response time with a long tail: mostly 40-300 ms, now and then seconds.
function responseTime() {
  return Math.round(40 + -Math.log(1 - Math.random()) * 120);
}

// `now` as RFC 3339 with microseconds; `seq` picks the microseconds, so results sent in the same millisecond for
// the same project still differ in (project_id, polled_at).
function polledAt(now, seq) {
  const micros = String(seq % 1000).padStart(3, '0');
  return new Date(now).toISOString().replace('Z', `${micros}Z`);
}

function pollResult(projectId, at, runId) {
  const r = Math.random();
  const result = {
    project_id: projectId,
    polled_at: at,
    target: `https://status.example.net/projects/${projectId}/health`,
    run: runId,
  };
  if (r < 0.88) {
    result.success = true;
    result.status_code = Math.random() < 0.9 ? 200 : pick([204, 301, 304]);
    result.response_time_ms = responseTime();
  } else if (r < 0.95) {
    result.success = false;
    result.status_code = pick([404, 429, 500, 502, 503, 503, 504]);
    result.response_time_ms = responseTime();
    if (Math.random() < 0.5) {
      result.error_message = `upstream answered ${result.status_code}`;
    }
  } else if (r < 0.98) {
    result.success = false;
    result.status_code = null; // no answer: null means absent
    result.response_time_ms = 10000;
    result.error_message = 'timed out after 10000 ms waiting for response headers';
  } else {
    result.success = false;
    result.response_time_ms = Math.round(Math.random() * 50);
    result.error_message = pick([
      'connection refused',
      'dns error: no record found for status.example.net',
      'tls handshake failed: certificate has expired',
      'connection reset by peer',
    ]);
  }
  (result.success ? pollsOk : pollsFailed).add(1);
  return result;
}

export default function (data) {
  const now = Date.now();
  const seq = exec.scenario.iterationInTest * ARRAY_SIZE;
  let body;
  let n;
  let name;
  if (Math.random() < ARRAY_SHARE) {
    // One poller flushing the results of 10 different projects.
    const first = Math.floor(Math.random() * PROJECTS);
    const step = 1 + Math.floor(Math.random() * (PROJECTS / ARRAY_SIZE - 1));
    const results = [];
    for (let i = 0; i < ARRAY_SIZE; i++) {
      results.push(pollResult(((first + i * step) % PROJECTS) + 1, polledAt(now, seq + i), data.runId));
    }
    body = results;
    n = ARRAY_SIZE;
    name = `poll_batch${ARRAY_SIZE}`;
  } else {
    body = pollResult(1 + Math.floor(Math.random() * PROJECTS), polledAt(now, seq), data.runId);
    n = 1;
    name = 'poll_single';
  }
  const res = http.post(`${BASE_URL}/api/v1/poll/update`, JSON.stringify(body), {
    headers: JSON_HEADERS,
    tags: { name: name },
  });
  check(res, {
    'status 202': (r) => r.status === 202,
    'accepted == number sent': (r) => accepted(r) === n,
  });
}

export function handleSummary(data) {
  return summarize(data, {
    title: 'ingest-gateway: poll results',
    description: `constant-arrival-rate (open model) against ${BASE_URL}/api/v1/poll/update`,
    params: { RATE: `${RATE}/s`, DURATION: DURATION, ARRAY_SHARE: ARRAY_SHARE, MAX_VUS: MAX_VUS, P99_MS: P99_MS },
  });
}

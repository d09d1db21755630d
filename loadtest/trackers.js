// k6 ramp test of ingest-gateway's tracker routes: 50 to 500 VUs, each a phone or tracker speaking its own app's protocol (OsmAnd, Traccar Client, GPSLogger, OwnTracks, Overland, Traccar forwarding); every answer must be exactly the client's success.
//
//   k6 run loadtest/trackers.js                                 # 10 min against http://127.0.0.1:8080
//   STAGES_SCALE=0.05 k6 run loadtest/trackers.js               # the same shape in 30 s, for a quick try
//   BASE_URL=http://10.0.0.5:8080 HTML_REPORT=trackers.html k6 run loadtest/trackers.js
//
// Stages as in ramp.js: 4 min from START_VUS (50) up to PEAK_VUS (500), 4 min at PEAK_VUS, 2 min down to 0;
// STAGES_SCALE multiplies every duration. VU n speaks one protocol, the (n mod 6)th of:
//   osmand_get        GET  /api/v1/osmand?id=…&timestamp=<unix s>&lat=…&lon=…&speed=<knots>…  (the OsmAnd app)
//   traccar_client    POST /api/v1/osmand, the same fields as a form                          (Traccar Client)
//   gpslogger         GET  /api/v1/osmand?lat=…&longitude=…&time=<ISO>&s=<m/s>&ser=<device>   (GPSLogger)
//   owntracks         POST /api/v1/owntracks, one {"_type":"location"} with X-Limit-U/-D        (OwnTracks)
//   overland          POST /api/v1/overland, a batch of OVERLAND_BATCH GeoJSON fixes            (Overland)
//   traccar_forward   POST /api/v1/traccar, {"position": {…}, "device": {…}}                   (a Traccar server)
// then sleeps 0.5-1.5 s (closed model, as ramp.js). Each request's device id carries the run id, the protocol, the
// VU and the iteration, and an Overland batch's fixes are a second apart: every fix is a new (device, time).
//
// A check per protocol on the exact answer its client counts as success: 200 and an empty body (OsmAnd, Traccar
// Client, GPSLogger, Traccar forwarding: these clients would run any text as a command), `[]` (OwnTracks: no
// friends' locations), `{"result":"ok"}` (Overland: the only answer it deletes its batch on). Thresholds: no failed
// request, every check of every protocol passes, p99 under P99_MS. The run is bounded: the stages, 5 s to ramp
// down, and REQUEST_TIMEOUT per request.
//
// Settings (environment): BASE_URL, STAGES_SCALE (1), START_VUS (50), PEAK_VUS (500), OVERLAND_BATCH (10),
// P99_MS (50), REQUEST_TIMEOUT (10s), HTML_REPORT (path of an HTML report to write).
import http from 'k6/http';
import { check, sleep } from 'k6';
import exec from 'k6/execution';
import { Counter } from 'k6/metrics';
import { latencyByName, summarize, TREND_STATS } from './lib/summary.js';
import { startRun } from './lib/gateway.js';

const BASE_URL = (__ENV.BASE_URL || 'http://127.0.0.1:8080').replace(/\/+$/, '');
const SCALE = Number(__ENV.STAGES_SCALE || 1);
const START_VUS = Number(__ENV.START_VUS || 50);
const PEAK_VUS = Number(__ENV.PEAK_VUS || 500);
const OVERLAND_BATCH = Number(__ENV.OVERLAND_BATCH || 10);
const P99_MS = Number(__ENV.P99_MS || 50);
const REQUEST_TIMEOUT = __ENV.REQUEST_TIMEOUT || '10s';
const KNOTS_PER_MPS = 1 / 0.514444;
// Fixes answered as the client's success, per protocol: after the run, the table must hold at least this many of
// the run's rows (`device_id LIKE 'k6-trk-<run id>-%'`).
const fixesAccepted = new Counter('fixes_accepted');

if (!(SCALE > 0)) {
  throw new Error(`STAGES_SCALE must be a number above 0, not ${__ENV.STAGES_SCALE}`);
}
if (!(Number.isInteger(OVERLAND_BATCH) && OVERLAND_BATCH >= 1)) {
  throw new Error(`OVERLAND_BATCH must be a whole number of at least 1, not ${__ENV.OVERLAND_BATCH}`);
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

// What each client counts as success, by the body of a 200.
const EMPTY = '';
const OWNTRACKS_OK = '[]';
const OVERLAND_OK = '{"result":"ok"}';

// Each protocol: how one iteration's request is built, and the body of its success.
const PROTOCOLS = [
  { name: 'osmand_get', success: EMPTY, request: osmandGet },
  { name: 'traccar_client', success: EMPTY, request: traccarClientForm },
  { name: 'gpslogger', success: EMPTY, request: gpsloggerGet },
  { name: 'owntracks', success: OWNTRACKS_OK, request: owntracks },
  { name: 'overland', success: OVERLAND_OK, request: overland },
  { name: 'traccar_forward', success: EMPTY, request: traccarForward },
];
const NAMES = PROTOCOLS.map((p) => p.name);

// Every check of each protocol must pass: a failure in a rare protocol is not hidden by the others' volume.
const checksByProtocol = {};
for (const name of NAMES) checksByProtocol[`checks{protocol:${name}}`] = ['rate==1.0'];

export const options = {
  scenarios: {
    trackers: {
      executor: 'ramping-vus',
      startVUs: START_VUS,
      stages: STAGES,
      gracefulRampDown: '5s',
    },
  },
  thresholds: Object.assign(
    {
      http_req_failed: ['rate==0'],
      checks: ['rate==1.0'],
      http_req_duration: [`p(99)<${P99_MS}`],
    },
    checksByProtocol,
    latencyByName(NAMES), // report each protocol's latency too
  ),
  summaryTrendStats: TREND_STATS,
};

// Runs once; its result reaches every VU, so all VUs share one run id (a base-36 timestamp plus a random suffix).
export function setup() {
  return startRun(BASE_URL);
}

// A position around Madrid, with what every protocol reports: speed in m/s, heading, accuracy, battery.
function position() {
  return {
    lat: 40.4168 + (Math.random() - 0.5) * 0.4,
    lon: -3.7038 + (Math.random() - 0.5) * 0.4,
    speedMps: Math.round(Math.random() * 300) / 10,
    heading: Math.floor(Math.random() * 3600) / 10,
    accuracy: 3 + Math.round(Math.random() * 20),
    altitude: Math.round(Math.random() * 7000) / 10,
    battery: 5 + Math.floor(Math.random() * 96),
  };
}

function query(fields) {
  return Object.keys(fields)
    .map((k) => `${encodeURIComponent(k)}=${encodeURIComponent(fields[k])}`)
    .join('&');
}

// The OsmAnd protocol's fields, as the OsmAnd app and Traccar Client send them (speed in knots).
function osmandFields(device, at) {
  const p = position();
  return {
    id: device,
    timestamp: Math.floor(at / 1000),
    lat: p.lat.toFixed(6),
    lon: p.lon.toFixed(6),
    speed: (p.speedMps * KNOTS_PER_MPS).toFixed(1),
    bearing: p.heading,
    altitude: p.altitude,
    accuracy: p.accuracy,
    batt: p.battery,
  };
}

function osmandGet(device, at) {
  return { method: 'GET', url: `${BASE_URL}/api/v1/osmand?${query(osmandFields(device, at))}`, body: null, fixes: 1 };
}

function traccarClientForm(device, at) {
  const fields = Object.assign(osmandFields(device, at), { charge: 'false' });
  return {
    method: 'POST',
    url: `${BASE_URL}/api/v1/osmand`,
    body: query(fields),
    headers: { 'Content-Type': 'application/x-www-form-urlencoded' },
    fixes: 1,
  };
}

// GPSLogger's custom URL with its own names: %LAT, %LON as `longitude`, %TIME (ISO 8601), %SPD in m/s, %SER.
function gpsloggerGet(device, at) {
  const p = position();
  const fields = {
    lat: p.lat.toFixed(6),
    longitude: p.lon.toFixed(6),
    time: new Date(at).toISOString(),
    s: p.speedMps,
    ser: device,
    acc: p.accuracy,
    dir: p.heading,
  };
  return { method: 'GET', url: `${BASE_URL}/api/v1/osmand?${query(fields)}`, body: null, fixes: 1 };
}

// The Android app's location message: the device is X-Limit-U:X-Limit-D; `vel` in km/h, `tst` in seconds.
function owntracks(device, at) {
  const p = position();
  const [user, phone] = splitDevice(device);
  const body = {
    _type: 'location',
    tid: 'JJ',
    lat: p.lat,
    lon: p.lon,
    tst: Math.floor(at / 1000),
    acc: p.accuracy,
    vel: Math.round(p.speedMps * 3.6),
    cog: Math.round(p.heading),
    batt: p.battery,
    t: 'u',
  };
  return {
    method: 'POST',
    url: `${BASE_URL}/api/v1/owntracks`,
    body: JSON.stringify(body),
    headers: { 'Content-Type': 'application/json', 'X-Limit-U': user, 'X-Limit-D': phone },
    fixes: 1,
  };
}

// `k6-trk-<run>-owntracks` and `v<vu>-i<iteration>`: joined by the gateway as user:device.
function splitDevice(device) {
  const cut = device.lastIndexOf('-v');
  return [device.slice(0, cut), device.slice(cut + 1)];
}

// A batch of OVERLAND_BATCH fixes of one device, a second apart, oldest first, as the app queues them.
function overland(device, at) {
  const locations = [];
  for (let i = OVERLAND_BATCH - 1; i >= 0; i--) {
    const p = position();
    locations.push({
      type: 'Feature',
      geometry: { type: 'Point', coordinates: [p.lon, p.lat] },
      properties: {
        timestamp: new Date(at - i * 1000).toISOString(),
        speed: p.speedMps,
        course: p.heading,
        horizontal_accuracy: p.accuracy,
        altitude: p.altitude,
        battery_level: p.battery / 100,
        battery_state: 'unplugged',
        device_id: device,
      },
    });
  }
  return {
    method: 'POST',
    url: `${BASE_URL}/api/v1/overland`,
    body: JSON.stringify({ locations: locations }),
    headers: { 'Content-Type': 'application/json' },
    fixes: OVERLAND_BATCH,
  };
}

// What a Traccar server forwards (forward.type=json) for one position of a device it decoded: speed in knots.
function traccarForward(device, at) {
  const p = position();
  const fixTime = new Date(at).toISOString();
  const body = {
    position: {
      id: 0,
      deviceId: 1,
      protocol: 'teltonika',
      serverTime: new Date().toISOString(),
      deviceTime: fixTime,
      fixTime: fixTime,
      outdated: false,
      valid: true,
      latitude: p.lat,
      longitude: p.lon,
      altitude: p.altitude,
      speed: p.speedMps * KNOTS_PER_MPS,
      course: p.heading,
      accuracy: p.accuracy,
      attributes: { batteryLevel: p.battery, ignition: true, odometer: 120000 },
    },
    device: { id: 1, name: 'k6 truck', uniqueId: device, status: 'online' },
  };
  return {
    method: 'POST',
    url: `${BASE_URL}/api/v1/traccar`,
    body: JSON.stringify(body),
    headers: { 'Content-Type': 'application/json' },
    fixes: 1,
  };
}

export default function (data) {
  const vu = exec.vu.idInTest;
  const protocol = PROTOCOLS[vu % PROTOCOLS.length];
  // Unique per run, protocol, VU and iteration: no fix repeats an earlier (device_id, recorded_at).
  const device = `k6-trk-${data.runId}-${protocol.name}-v${vu}-i${exec.vu.iterationInScenario}`;
  const req = protocol.request(device, Date.now());
  const res = http.request(req.method, req.url, req.body, {
    headers: req.headers,
    tags: { name: protocol.name, protocol: protocol.name },
    timeout: REQUEST_TIMEOUT,
  });
  const ok = check(
    res,
    {
      [`${protocol.name}: 200 with ${protocol.success === EMPTY ? 'an empty body' : protocol.success}`]: (r) =>
        r.status === 200 && (r.body || '') === protocol.success,
    },
    { protocol: protocol.name },
  );
  if (ok) {
    fixesAccepted.add(req.fixes, { protocol: protocol.name });
  }
  sleep(0.5 + Math.random());
}

export function handleSummary(data) {
  return summarize(data, {
    title: `ingest-gateway: tracker routes, ramp ${START_VUS} → ${PEAK_VUS} VUs`,
    description: `ramping-vus (closed model) against ${BASE_URL}/api/v1/{osmand,owntracks,overland,traccar}`,
    params: {
      STAGES: STAGES.map((s) => `${s.duration}→${s.target}`).join(', '),
      STAGES_SCALE: SCALE,
      START_VUS: START_VUS,
      PEAK_VUS: PEAK_VUS,
      OVERLAND_BATCH: OVERLAND_BATCH,
      P99_MS: P99_MS,
      REQUEST_TIMEOUT: REQUEST_TIMEOUT,
    },
  });
}

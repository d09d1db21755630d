-- wrk script for ingest-gateway: POSTs a JSON array of 1000 location updates per request, each update with a unique device_id.
--
--   wrk -t2 -c8 -d30s -s loadtest/wrk/batch1000.lua http://127.0.0.1:8080/api/v1/location/update
--
-- A URL without a path posts to /api/v1/location/update. Each request's body (about 150 KB) differs from the last
-- only in the request number inside every device_id: "wrk1k-<run>-<thread>-<request>-<i>". The closing line counts
-- 202 and non-202 responses and the updates the 202s accepted (requests/s x 1000 = updates/s).

local BATCH = 1000

-- Runs in wrk's main Lua state: number the threads and give them one run id.
local threads = {}
local run_stamp = tostring(os.time())

function setup(thread)
  threads[#threads + 1] = thread
  thread:set("thread_id", #threads)
  thread:set("run_id", run_stamp)
end

-- Per-thread state (each wrk thread has its own Lua state).
local counter = 0
local path
local headers = { ["Content-Type"] = "application/json" }
local format = string.format
ok_202 = 0
non_202 = 0
statuses = {}

function init(args)
  path = (wrk.path == nil or wrk.path == "" or wrk.path == "/") and "/api/v1/location/update" or wrk.path
  math.randomseed(os.time() * 1000 + thread_id)
end

-- The body is built once per thread with a placeholder where each request's number goes, so that a request costs
-- one C-level substitution instead of 1000 string.format calls: the load generator must not be what limits the
-- run. Timestamps are the thread's start time (well inside the gateway's 30-day window for any run).
local template
local PLACEHOLDER = "@REQ@"

local function build_template()
  local now = os.date("!%Y-%m-%dT%H:%M:%SZ")
  local prefix = format("wrk1k-%s-%d-%s-", run_id, thread_id, PLACEHOLDER)
  local parts = {}
  for i = 1, BATCH do
    parts[i] = format(
      '{"device_id":"%s%d","recorded_at":"%s","lat":%.6f,"lon":%.6f,"speed_kmh":%.1f,"heading_deg":%.1f,"accuracy_m":%d,"source":"wrk"}',
      prefix, i, now,
      48.0 + math.random() * 6.0, 2.0 + math.random() * 12.0,
      math.random() * 130.0, math.random() * 359.9, math.random(3, 50))
  end
  return "[" .. table.concat(parts, ",") .. "]"
end

function request()
  counter = counter + 1
  template = template or build_template()
  local body = template:gsub(PLACEHOLDER, tostring(counter))
  return wrk.format("POST", path, headers, body)
end

function response(status, headers, body)
  if status == 202 then
    ok_202 = ok_202 + 1
  else
    non_202 = non_202 + 1
    statuses[status] = (statuses[status] or 0) + 1
  end
end

function done(summary, latency, requests)
  local ok, bad, by_status = 0, 0, {}
  for _, thread in ipairs(threads) do
    ok = ok + (thread:get("ok_202") or 0)
    bad = bad + (thread:get("non_202") or 0)
    for status, n in pairs(thread:get("statuses") or {}) do
      by_status[status] = (by_status[status] or 0) + n
    end
  end
  local parts = {}
  for status, n in pairs(by_status) do
    parts[#parts + 1] = format("%s=%d", tostring(status), n)
  end
  table.sort(parts)
  local e = summary.errors
  io.write(format(
    "batch1000.lua: 202=%d non-202=%d%s updates_accepted=%d socket_errors(connect=%d read=%d write=%d timeout=%d)\n",
    ok, bad, #parts > 0 and (" [" .. table.concat(parts, " ") .. "]") or "", ok * BATCH,
    e.connect, e.read, e.write, e.timeout))
end

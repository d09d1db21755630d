-- wrk script for ingest-gateway: POSTs one location update per request, each with a unique device_id and a fresh timestamp.
--
--   wrk -t2 -c32 -d30s -s loadtest/wrk/single.lua http://127.0.0.1:8080/api/v1/location/update
--
-- A URL without a path posts to /api/v1/location/update. device_id is "wrk1-<run>-<thread>-<counter>", so no two
-- requests of a run (or of two runs) share a (device_id, recorded_at) key. The closing line counts 202 and non-202.

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
ok_202 = 0
non_202 = 0
statuses = {}

function init(args)
  path = (wrk.path == nil or wrk.path == "" or wrk.path == "/") and "/api/v1/location/update" or wrk.path
  math.randomseed(os.time() * 1000 + thread_id)
end

-- WRK_DELAY_MS (optional, may be fractional): the average pause of each connection before each request, for a
-- load below saturation (ingest-bench's soak sets it). A fraction becomes one more millisecond that often, since
-- wrk's delays are whole milliseconds.
local pause_ms = tonumber(os.getenv("WRK_DELAY_MS") or "") or 0
if pause_ms > 0 then
  local whole = math.floor(pause_ms)
  local fraction = pause_ms - whole
  function delay()
    if math.random() < fraction then
      return whole + 1
    end
    return whole
  end
end

function request()
  counter = counter + 1
  local body = string.format(
    '{"device_id":"wrk1-%s-%d-%d","recorded_at":"%s","lat":%.6f,"lon":%.6f,"speed_kmh":%.1f,"heading_deg":%.1f,"accuracy_m":%d,"source":"wrk"}',
    run_id, thread_id, counter, os.date("!%Y-%m-%dT%H:%M:%SZ"),
    48.0 + math.random() * 6.0, 2.0 + math.random() * 12.0,
    math.random() * 130.0, math.random() * 359.9, math.random(3, 50))
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
    parts[#parts + 1] = string.format("%s=%d", tostring(status), n)
  end
  table.sort(parts)
  local e = summary.errors
  io.write(string.format(
    "single.lua: 202=%d non-202=%d%s updates_accepted=%d socket_errors(connect=%d read=%d write=%d timeout=%d)\n",
    ok, bad, #parts > 0 and (" [" .. table.concat(parts, " ") .. "]") or "", ok,
    e.connect, e.read, e.write, e.timeout))
end

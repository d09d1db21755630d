-- wrk script for ingest-gateway's OsmAnd route: one fix per GET in the query form of Traccar Client and the OsmAnd app, each with a unique device id.
--
--   wrk -t2 -c32 -d30s -s loadtest/wrk/osmand.lua http://127.0.0.1:8080/api/v1/osmand
--
-- A URL without a path sends to /api/v1/osmand. Each request is
--   GET /api/v1/osmand?id=wrkos-<run>-<thread>-<counter>&timestamp=<unix s>&lat=..&lon=..&speed=<knots>&bearing=..
--       &altitude=..&accuracy=..&batt=..
-- so, as with single.lua, no two requests of a run (or of two runs) share a (device, timestamp) key and every fix
-- lands as a row. Success is what these clients count as one: 200 with an empty body (any text in the body would
-- be run as a command). The closing line counts successes and everything else.

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
local format = string.format
ok_200 = 0
non_200 = 0
statuses = {}

function init(args)
  path = (wrk.path == nil or wrk.path == "" or wrk.path == "/") and "/api/v1/osmand" or wrk.path
  math.randomseed(os.time() * 1000 + thread_id)
end

function request()
  counter = counter + 1
  -- Speed in knots, as the protocol sends it (0-70 kn is 0-130 km/h, single.lua's range).
  local url = format(
    "%s?id=wrkos-%s-%d-%d&timestamp=%d&lat=%.6f&lon=%.6f&speed=%.1f&bearing=%.1f&altitude=%.1f&accuracy=%d&batt=%d",
    path, run_id, thread_id, counter, os.time(),
    48.0 + math.random() * 6.0, 2.0 + math.random() * 12.0,
    math.random() * 70.0, math.random() * 359.9, math.random() * 500.0, math.random(3, 50), math.random(5, 100))
  return wrk.format("GET", url)
end

function response(status, headers, body)
  if status == 200 and (body == nil or body == "") then
    ok_200 = ok_200 + 1
  else
    non_200 = non_200 + 1
    local what = status == 200 and "200-wrong-body" or status
    statuses[what] = (statuses[what] or 0) + 1
  end
end

function done(summary, latency, requests)
  local ok, bad, by_status = 0, 0, {}
  for _, thread in ipairs(threads) do
    ok = ok + (thread:get("ok_200") or 0)
    bad = bad + (thread:get("non_200") or 0)
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
    "osmand.lua: 200=%d non-200=%d%s updates_accepted=%d socket_errors(connect=%d read=%d write=%d timeout=%d)\n",
    ok, bad, #parts > 0 and (" [" .. table.concat(parts, " ") .. "]") or "", ok,
    e.connect, e.read, e.write, e.timeout))
end

-- wrk script for ingest-gateway's Overland route: POSTs a batch of 200 GeoJSON fixes per request, each fix with a unique device_id.
--
--   wrk -t2 -c8 -d30s -s loadtest/wrk/overland200.lua http://127.0.0.1:8080/api/v1/overland
--
-- A URL without a path posts to /api/v1/overland. The body is the Overland app's: {"locations": [Feature, …]}, each
-- Feature a Point with [lon, lat] and properties timestamp (ISO 8601), speed (m/s), course, horizontal_accuracy,
-- battery_level (0-1) and device_id. device_id is "wrkov-<run>-<thread>-<request>-<i>", as in batch1000.lua: every
-- fix is a new (device, time) key and lands as a row, and PostgreSQL gets the same rows as from the native
-- 1000-update variant. Success is the only answer the app deletes its batch on: 200 with {"result":"ok"}. The
-- closing line counts successes, everything else, and the fixes the successes carried.

local BATCH = 200
local SUCCESS = '{"result":"ok"}'

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
ok_200 = 0
non_200 = 0
statuses = {}

function init(args)
  path = (wrk.path == nil or wrk.path == "" or wrk.path == "/") and "/api/v1/overland" or wrk.path
  math.randomseed(os.time() * 1000 + thread_id)
end

-- Built once per thread with a placeholder where each request's number goes, as in batch1000.lua, so that the load
-- generator is not what limits the run. Timestamps are the thread's start time.
local template
local PLACEHOLDER = "@REQ@"

local function build_template()
  local now = os.date("!%Y-%m-%dT%H:%M:%SZ")
  local prefix = format("wrkov-%s-%d-%s-", run_id, thread_id, PLACEHOLDER)
  local parts = {}
  for i = 1, BATCH do
    parts[i] = format(
      '{"type":"Feature","geometry":{"type":"Point","coordinates":[%.6f,%.6f]},"properties":{"timestamp":"%s","speed":%.1f,"course":%.1f,"horizontal_accuracy":%d,"battery_level":%.2f,"device_id":"%s%d"}}',
      2.0 + math.random() * 12.0, 48.0 + math.random() * 6.0, now,
      math.random() * 36.0, math.random() * 359.9, math.random(3, 50), math.random(5, 100) / 100,
      prefix, i)
  end
  return '{"locations":[' .. table.concat(parts, ",") .. "]}"
end

function request()
  counter = counter + 1
  template = template or build_template()
  local body = template:gsub(PLACEHOLDER, tostring(counter))
  return wrk.format("POST", path, headers, body)
end

function response(status, headers, body)
  if status == 200 and body == SUCCESS then
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
    "overland200.lua: 200=%d non-200=%d%s updates_accepted=%d socket_errors(connect=%d read=%d write=%d timeout=%d)\n",
    ok, bad, #parts > 0 and (" [" .. table.concat(parts, " ") .. "]") or "", ok * BATCH,
    e.connect, e.read, e.write, e.timeout))
end

-- wrk script of benchmarks/ingest.py: POST distinct events, count what was sent, print one JSON line.
--
-- Arguments (after "--"): events per request, number of users, number of event types, path.
-- Every request carries fresh (event type, user) pairs spread over many users, so per-user buckets
-- grow as they would in production. Each thread counts the requests it generated ("sent"); wrk's
-- own summary counts the responses it read. Requests in flight when the run stops were sent but
-- their answers never read: the script reports both, so the caller can bound what Redis must hold.

local threads = {}
local thread_count = 0

function setup(thread)
  thread_count = thread_count + 1
  thread:set("id", thread_count)
  table.insert(threads, thread)
end

local per_request, users, types, path
local seq = 0
sent = 0
local headers = {["Content-Type"] = "application/json"}

function init(args)
  per_request = tonumber(args[1] or "1")
  users = tonumber(args[2] or "100000")
  types = tonumber(args[3] or "20")
  path = args[4] or "/v1/events"
  -- threads start at different offsets so no two threads send the same sequence
  seq = (id or 1) * 1000003
end

local function one_event()
  seq = seq + 1
  local user = (seq * 7919) % users
  return string.format('{"event":"event_%02d","user_id":"user-%06d"}', seq % types, user)
end

function request()
  sent = sent + 1
  local body
  if per_request == 1 then
    body = one_event()
  else
    local parts = {}
    for i = 1, per_request do
      parts[i] = one_event()
    end
    body = "[" .. table.concat(parts, ",") .. "]"
  end
  return wrk.format("POST", path, headers, body)
end

function done(summary, latency, requests)
  local total_sent = 0
  for _, thread in ipairs(threads) do
    total_sent = total_sent + (thread:get("sent") or 0)
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"sent":%d,"status_errors":%d,' ..
    '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"timeouts":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, total_sent, e.status,
    e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end

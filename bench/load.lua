-- The wrk side of bench/load.py: the requests its connections send, and what they were answered.
--
-- wrk -s bench/load.lua URL -- MODE KEY OUT RUN MODEL ITEMS REPLAY CONFLICT SEED
--   MODE "post": POST /v1/forget-requests. A new subject_request_id RUN-<thread>-<n> (expects 201); with probability
--     REPLAY an accepted body again (200 and the original id), with probability CONFLICT an accepted
--     subject_request_id with another body (409). Every answer is written to OUT-<thread>.txt as
--     "kind status subject_request_id request_id", for the database audit; the kind and subject travel in the
--     X-Request-ID header, which the API echoes.
--   MODE "get": GET MODEL (a path, e.g. /v1/jobs?limit=50).
-- At the end one line "BENCH requests=.. duration_us=.. ..." goes to stdout: counts, socket errors, p50/p99 latency.

local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads) -- a global of that thread's own Lua state
end

function init(args)
  mode, key, out, run, model = args[1], args[2], args[3], args[4], args[5]
  items, replay, conflict = tonumber(args[6]), tonumber(args[7]), tonumber(args[8])
  math.randomseed(tonumber(args[9]) * 1000 + tid)
  counter, accepted = 0, {}
  headers = { ["Authorization"] = "Bearer " .. key, ["Content-Type"] = "application/json" }
  if mode == "post" then
    answers = io.open(string.format("%s-%d.txt", out, tid), "w")
    answers:setvbuf("line")
  end
end

-- The body bench/load.py's request_body() builds for the same subject, item count and variant.
local function body(subject, variant)
  local parts = {}
  for i = 0, items - 1 do
    parts[#parts + 1] = string.format(
      '{"text":"%s%s item %d: Alex Example, 1 Sample Road, Testville, +00 000 %04d"}', subject, variant, i, i
    )
  end
  return string.format(
    '{"subject_request_id":"%s","model":"%s","items":[%s]}', subject, model, table.concat(parts, ",")
  )
end

function request()
  if mode == "get" then
    return wrk.format("GET", model, headers)
  end
  local kind, subject, variant, r = "new", nil, "", math.random()
  if #accepted > 0 and r < replay then
    kind, subject = "replay", accepted[math.random(#accepted)]
  elseif #accepted > 0 and r < replay + conflict then
    kind, subject, variant = "conflict", accepted[math.random(#accepted)], " (changed)"
  else
    counter = counter + 1
    subject = string.format("%s-%d-%d", run, tid, counter)
  end
  headers["X-Request-ID"] = kind .. ":" .. subject
  return wrk.format("POST", "/v1/forget-requests", headers, body(subject, variant))
end

function response(status, headers, body)
  if mode ~= "post" then
    return
  end
  local kind, subject = string.match(headers["x-request-id"] or headers["X-Request-ID"] or "", "^(%a+):(.+)$")
  if status == 201 and kind == "new" then
    accepted[#accepted + 1] = subject
  end
  answers:write(kind or "?", " ", status, " ", subject or "-", " ", string.match(body, '"id":"([%x%-]+)"') or "-", "\n")
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d connect=%d read=%d write=%d timeout=%d status=%d p50_us=%d p99_us=%d\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)
  ))
end

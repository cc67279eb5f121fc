-- wrk script: POST a rotating set of prepared request bodies and print a JSON summary.
-- Usage: wrk -t2 -c16 -d10s -s post_bodies.lua URL -- BODY_DIR N CONTENT_TYPE [AUTH_HEADER]
-- wrk is C: the load generator costs far less CPU than a Python client on the same two cores.
local bodies = {}
local counter = 0

function init(args)
  local dir, n = args[1], tonumber(args[2])
  wrk.method = "POST"
  wrk.headers["Content-Type"] = args[3]
  if args[4] ~= nil and args[4] ~= "" then
    wrk.headers["Authorization"] = args[4]
  end
  for i = 0, n - 1 do
    local f = assert(io.open(dir .. "/" .. i .. ".body", "rb"))
    bodies[i + 1] = f:read("*all")
    f:close()
  end
  counter = math.random(0, n - 1)
end

function request()
  counter = counter + 1
  return wrk.format(nil, nil, nil, bodies[(counter % #bodies) + 1])
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, ' ..
    '"non_2xx": %d, "socket_errors": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.status, e.connect + e.read + e.write + e.timeout))
end

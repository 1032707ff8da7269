-- wrk script of phase c (bench/load.py). The environment chooses the request:
-- BENCH_MODE get|post|batch, BENCH_PATH (get), BENCH_ITEMS (batch), and the files
-- BENCH_PAYERS ("user_id account authorization" per line) and BENCH_PAYEES (one
-- account id per line). Prints one BENCH_JSON line with the summary at the end.
local MODE = os.getenv("BENCH_MODE") or "get"
local ITEMS = tonumber(os.getenv("BENCH_ITEMS") or "100")
wrk.method = "GET"
wrk.path = os.getenv("BENCH_PATH") or "/currencies"

local USERS, PAYEES = {}, {}
if MODE ~= "get" then
  for line in io.lines(os.getenv("BENCH_PAYERS")) do
    local id, account, auth = line:match("^(%d+) (%d+) (.+)$")
    USERS[#USERS + 1] = {id, tonumber(account), auth}
  end
  for line in io.lines(os.getenv("BENCH_PAYEES")) do
    PAYEES[#PAYEES + 1] = tonumber(line)
  end
end

local counter = 0
function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
end

function init(args)
  math.randomseed(7919 * (tid + 1))
  n = tid
end

local function payee(account)
  while true do
    local to = PAYEES[math.random(#PAYEES)]
    if to ~= account then return to end
  end
end

local function amount()
  local minor = math.random(100, 9999)
  return string.format("%d.%02d", math.floor(minor / 100), minor % 100)
end

if MODE ~= "get" then
  function request()
    n = n + 1
    local u = USERS[(n % #USERS) + 1]
    local headers = {["Authorization"] = u[3]}
    if MODE == "post" then
      headers["Content-Type"] = "application/x-www-form-urlencoded"
      local body = string.format("from=%d&to=%d&amount=%s", u[2], payee(u[2]), amount())
      return wrk.format("POST", "/users/" .. u[1] .. "/transfers", headers, body)
    end
    headers["Content-Type"] = "application/json"
    local items = {}
    for i = 1, ITEMS do
      items[i] = string.format('{"from":%d,"to":%d,"amount":"%s"}', u[2], payee(u[2]), amount())
    end
    local body = '{"transfers":[' .. table.concat(items, ",") .. ']}'
    return wrk.format("POST", "/users/" .. u[1] .. "/transfers/batch", headers, body)
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,' ..
    '"mean_us":%.1f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean))
end

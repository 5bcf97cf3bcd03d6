-- wrk script used for every run of the "small requests" scenario.
--
-- Through a proxy, wrk is pointed at the proxy and must send absolute-form
-- requests: run.py sets BENCH_ORIGIN (e.g. "127.0.0.1:8080") and BENCH_PATH
-- (e.g. "/1k"); the request line then becomes
--   GET http://127.0.0.1:8080/1k HTTP/1.1   with   Host: 127.0.0.1:8080
-- The request is static (built once per thread, like wrk's default), which
-- keeps the load generator cheap. Without BENCH_ORIGIN wrk sends the usual
-- origin-form request to the URL given on its command line (direct runs).
-- BENCH_PROXY_AUTH, when set, is sent as the Proxy-Authorization header
-- (e.g. "Basic YmVuY2g6cHc=" for the policy_cost scenario).

local origin = os.getenv("BENCH_ORIGIN")
if origin then
  wrk.path = "http://" .. origin .. (os.getenv("BENCH_PATH") or "/")
  wrk.headers["Host"] = origin
end
local proxy_auth = os.getenv("BENCH_PROXY_AUTH")
if proxy_auth and proxy_auth ~= "" then
  wrk.headers["Proxy-Authorization"] = proxy_auth
end

-- One machine-readable line; latencies are in microseconds. "status" counts
-- responses with a status code > 399 (wrk's non-2xx/3xx counter).
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d, ' ..
    '"p50_us": %d, "p90_us": %d, "p99_us": %d, "mean_us": %.1f, "max_us": %d}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end

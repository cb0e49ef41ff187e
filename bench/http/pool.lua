-- wrk script for bench/http.py: GET <path> with one of a pool of session
-- cookies, round-robin, each thread taking every Nth one so that no two
-- in-flight requests share a session; done() prints the result as one JSON
-- line prefixed with "WRK-JSON ".
--   wrk -t2 -c32 -d10s -s pool.lua http://127.0.0.1:PORT -- IDS_FILE PATH THREADS
local created = 0

function setup(thread)
    created = created + 1
    thread:set("thread_no", created)
end

function init(args)
    local ids_file, path, step = args[1], args[2], tonumber(args[3])
    local all = {}
    for line in io.lines(ids_file) do
        if line ~= "" then
            all[#all + 1] = line
        end
    end
    -- setup() gave this thread's own Lua state its number before init()
    requests = {}
    for i = thread_no, #all, step do
        requests[#requests + 1] = wrk.format("GET", path, { Cookie = "PHPSESSID=" .. all[i] })
    end
    if #requests == 0 then
        error("no session ids in " .. ids_file)
    end
    next_request = 1
end

function request()
    local r = requests[next_request]
    next_request = next_request + 1
    if next_request > #requests then
        next_request = 1
    end
    return r
end

function done(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        'WRK-JSON {"requests": %d, "duration_us": %d, "bytes": %d, '
        .. '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, '
        .. '"latency_us": {"mean": %.1f, "p50": %d, "p90": %d, "p99": %d, "max": %d}}\n',
        summary.requests, summary.duration, summary.bytes,
        e.connect, e.read, e.write, e.status, e.timeout,
        latency.mean, latency:percentile(50), latency:percentile(90),
        latency:percentile(99), latency.max))
end

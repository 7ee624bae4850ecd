-- wrk script: POST bodies, count answers by status class.
--
-- $BENCH_BODY_FILE: one body, sent as is.
-- $BENCH_MANIFEST: lines "<User-Agent>\t<body file>"; the bodies are cycled, each with its
-- User-Agent header, and every "@@@@@@@@@@@@@@@@@@@@@@@@" (24 characters, the first part of each
-- event id, see bench/events.py) becomes a prefix unique to the request:
-- $BENCH_ID_TAG (8 hex, one per wrk run) .. thread (4 hex) .. request counter (12 hex);
-- "%SENT_AT%" becomes the time of sending (UTC, RFC 3339, whole seconds), as apex.js's sentAt.
local MARKER = string.rep("@", 24)

local function read(path)
  local f = assert(io.open(path, "rb"))
  local text = f:read("*a")
  f:close()
  return text
end

local SENT_AT = "%SENT_AT%"

-- The body as pieces: text, ID (the request's prefix goes there) and SENT (the time now).
local ID, SENT = {}, {}
local function split(text)
  local parts, start = {}, 1
  while true do
    local id_at = string.find(text, MARKER, start, true)
    local sent_at = string.find(text, SENT_AT, start, true)
    local at, token, width = id_at, ID, #MARKER
    if sent_at and (not id_at or sent_at < id_at) then
      at, token, width = sent_at, SENT, #SENT_AT
    end
    if not at then
      table.insert(parts, string.sub(text, start))
      return parts
    end
    table.insert(parts, string.sub(text, start, at - 1))
    table.insert(parts, token)
    start = at + width
  end
end

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

local manifest = os.getenv("BENCH_MANIFEST")
local bodies = {}
if manifest then
  for line in io.lines(manifest) do
    local agent, path = string.match(line, "^(.-)\t(.+)$")
    table.insert(bodies, { agent = agent, parts = split(read(path)) })
  end
else
  wrk.body = read(os.getenv("BENCH_BODY_FILE"))
end
local tag = os.getenv("BENCH_ID_TAG") or "00000000"

local threads = {}
function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

function init(args)
  ok, other, sent = 0, 0, 0
end

if manifest then
  function request()
    sent = sent + 1
    local body = bodies[(sent - 1) % #bodies + 1]
    local prefix = string.format("%s%04x%012x", tag, tid, sent)
    local parts, out = body.parts, {}
    for i = 1, #parts do
      local part = parts[i]
      if part == ID then
        out[i] = prefix
      elseif part == SENT then
        out[i] = os.date("!%Y-%m-%dT%H:%M:%SZ")
      else
        out[i] = part
      end
    end
    wrk.headers["User-Agent"] = body.agent
    return wrk.format(nil, nil, nil, table.concat(out))
  end
end

function response(status, headers, body)
  if status == 200 then ok = ok + 1 else other = other + 1 end
end

function done(summary, latency, requests)
  local total_ok, total_other = 0, 0
  for _, t in ipairs(threads) do
    total_ok = total_ok + t:get("ok")
    total_other = total_other + t:get("other")
  end
  io.write(string.format("BENCH_RESULT ok=%d other=%d errors=%d p50_us=%d p99_us=%d\n",
    total_ok, total_other,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99)))
end

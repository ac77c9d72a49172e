-- Token buckets shared through Redis: one call decides a batch of requests,
-- each over every limit it must pass, atomically.
-- ARGV[1]: '' for the Redis server's clock (TIME), which is all the gateway
-- ever sends; a test stepping a fake clock sends the time in ms instead.
-- Then, per request: n (its buckets), cost, max_wait_ms, and per bucket
-- refill_period_ms, refill_tokens, max_tokens. KEYS: the requests' buckets,
-- n after n, in that order. A negative cost gives -cost tokens back (capped).
-- A negative max_wait_ms only looks (the admin view): nothing is taken or
-- written, and the reply is what a request would find.
-- Returns, per request: admitted (0|1), wait_ms (admitted: the delay of a
-- reservation, 0 without one; denied: until every limit would admit), the
-- index (1-based) of the limit the headers report, then per bucket: tokens
-- left and ms until its next refill.
--
-- Same semantics as the in-process buckets (limiting/bucket.py and
-- MemoryStore): a bucket starts full; every whole refill_period (counted from
-- the Unix epoch on the Redis server's clock, one clock for every gateway)
-- adds refill_tokens, capped at max_tokens. A request is admitted when every
-- one of its buckets holds cost tokens; then each gives them; otherwise none
-- does. With max_wait_ms, a request whose tokens will all be there within it
-- reserves them (the buckets go below zero) and is admitted with that wait.
-- A bucket's hash holds t (tokens), k (the period count they are up to date
-- at) and p r m, the limit they were counted under. The tokens owed are
-- settled under that stored limit, then capped at the request's max_tokens:
-- after a reload that changed the limit, the old one is settled and the new
-- one applies from now on (MemoryStore._respec). A full bucket is deleted (it
-- is the same as a missing one); any other expires when it would be full again.
local now
if ARGV[1] == '' then
  local now_parts = redis.call('TIME')
  now = tonumber(now_parts[1]) * 1000 + math.floor(tonumber(now_parts[2]) / 1000)
else
  now = tonumber(ARGV[1])
end

local function settled(key, period, refill, max_tokens)
  local state = redis.call('HMGET', key, 't', 'k', 'p', 'r', 'm')
  local tokens = tonumber(state[1])
  if tokens == nil then
    return max_tokens
  end
  local last = tonumber(state[2])
  -- a hash written before r and m were stored was counted under this limit
  local old_period = tonumber(state[3]) or period
  local old_refill = tonumber(state[4]) or refill
  local old_max = tonumber(state[5]) or max_tokens
  local old_tick = math.floor(now / old_period)
  if old_tick > last then
    tokens = math.min(old_max, tokens + (old_tick - last) * old_refill)
  end
  return math.min(tokens, max_tokens)
end

local function store(key, tokens, tick, period, refill, max_tokens, to_next)
  local missing = max_tokens - tokens
  if missing <= 0 then
    redis.call('DEL', key)
  else
    redis.call('HSET', key, 't', tokens, 'k', tick, 'p', period, 'r', refill, 'm', max_tokens)
    local ticks = math.ceil(missing / refill)
    redis.call('PEXPIRE', key, to_next + (ticks - 1) * period)
  end
end

local out = {}
local arg = 2
local first_key = 1
while arg <= #ARGV do
  local n = tonumber(ARGV[arg])
  local cost = tonumber(ARGV[arg + 1])
  local max_wait = tonumber(ARGV[arg + 2])
  arg = arg + 3
  local tokens, ticks, to_next, periods, refills, maxes = {}, {}, {}, {}, {}, {}
  local wait, waiting = 0, 1
  for j = 1, n do
    local period = tonumber(ARGV[arg])
    local refill = tonumber(ARGV[arg + 1])
    local max_tokens = tonumber(ARGV[arg + 2])
    arg = arg + 3
    local tick = math.floor(now / period)
    periods[j], refills[j], maxes[j], ticks[j] = period, refill, max_tokens, tick
    tokens[j] = settled(KEYS[first_key + j - 1], period, refill, max_tokens)
    to_next[j] = (tick + 1) * period - now
    local missing = cost - tokens[j]
    if missing > 0 then
      local this_wait = to_next[j] + (math.ceil(missing / refill) - 1) * period
      if this_wait > wait then
        wait, waiting = this_wait, j
      end
    end
  end
  local admitted = 0
  if max_wait < 0 then
    admitted = 1  -- a look: the settled tokens, untouched
  elseif cost < 0 or wait <= max_wait then
    admitted = 1
    for j = 1, n do
      tokens[j] = math.min(maxes[j], tokens[j] - cost)
    end
  end
  -- Denied too, each bucket is written as settled: after a reload the new
  -- limit applies from the first request that meets it, admitted or not
  -- (MemoryStore._bucket settles and re-specs on every take).
  if max_wait >= 0 then
    for j = 1, n do
      store(KEYS[first_key + j - 1], tokens[j], ticks[j], periods[j], refills[j], maxes[j],
        to_next[j])
    end
  end
  local reporting = waiting
  if admitted == 1 then
    reporting = 1
    for j = 2, n do
      if tokens[j] < tokens[reporting] then
        reporting = j
      end
    end
  end
  out[#out + 1] = admitted
  out[#out + 1] = wait
  out[#out + 1] = reporting
  for j = 1, n do
    out[#out + 1] = tokens[j]
    out[#out + 1] = to_next[j]
  end
  first_key = first_key + n
end
return out

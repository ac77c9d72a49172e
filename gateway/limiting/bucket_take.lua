-- Token buckets shared through Redis: one call decides a batch of requests.
-- ARGV[1]: '' for the Redis server's clock (TIME), which is all the gateway
-- ever sends; a test stepping a fake clock sends the time in ms instead.
-- KEYS[i]: a bucket. ARGV[3i-1..3i+1]: refill_period_ms, refill_tokens, max_tokens.
-- Returns, per key: admitted (0|1), tokens_left, ms until the next refill.
--
-- Same semantics as the in-process buckets (limiting/bucket.py and
-- MemoryStore): a bucket starts full; every whole refill_period (counted from
-- the Unix epoch on the Redis server's clock, one clock for every gateway)
-- adds refill_tokens, capped at max_tokens; a request takes one token.
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
local out = {}
for i, key in ipairs(KEYS) do
  local base = (i - 1) * 3 + 1
  local period = tonumber(ARGV[base + 1])
  local refill = tonumber(ARGV[base + 2])
  local max_tokens = tonumber(ARGV[base + 3])
  local tick = math.floor(now / period)
  local state = redis.call('HMGET', key, 't', 'k', 'p', 'r', 'm')
  local tokens = tonumber(state[1])
  if tokens == nil then
    tokens = max_tokens
  else
    local last = tonumber(state[2])
    -- a hash written before r and m were stored was counted under this limit
    local old_period = tonumber(state[3]) or period
    local old_refill = tonumber(state[4]) or refill
    local old_max = tonumber(state[5]) or max_tokens
    local old_tick = math.floor(now / old_period)
    if old_tick > last then
      tokens = math.min(old_max, tokens + (old_tick - last) * old_refill)
    end
    tokens = math.min(tokens, max_tokens)
  end
  local admitted = 0
  if tokens > 0 then
    tokens = tokens - 1
    admitted = 1
  end
  local to_next = (tick + 1) * period - now
  local missing = max_tokens - tokens
  if missing <= 0 then
    redis.call('DEL', key)
  else
    redis.call('HSET', key, 't', tokens, 'k', tick, 'p', period, 'r', refill, 'm', max_tokens)
    local ticks = math.ceil(missing / refill)
    redis.call('PEXPIRE', key, to_next + (ticks - 1) * period)
  end
  out[#out + 1] = admitted
  out[#out + 1] = tokens
  out[#out + 1] = to_next
end
return out

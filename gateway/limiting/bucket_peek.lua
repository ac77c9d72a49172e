-- One bucket as the admin view shows it: the tokens a request would find,
-- settled as bucket_take.lua settles them, without taking or writing.
-- ARGV[1]: '' for the Redis server's clock (TIME), or a test's time in ms.
-- KEYS[1]: the bucket. ARGV[2..4]: refill_period_ms, refill_tokens, max_tokens.
-- Returns the tokens and ms until the next refill.
local now
if ARGV[1] == '' then
  local now_parts = redis.call('TIME')
  now = tonumber(now_parts[1]) * 1000 + math.floor(tonumber(now_parts[2]) / 1000)
else
  now = tonumber(ARGV[1])
end
local period = tonumber(ARGV[2])
local refill = tonumber(ARGV[3])
local max_tokens = tonumber(ARGV[4])
local tick = math.floor(now / period)
local state = redis.call('HMGET', KEYS[1], 't', 'k', 'p', 'r', 'm')
local tokens = tonumber(state[1])
if tokens == nil then
  tokens = max_tokens
else
  local last = tonumber(state[2])
  local old_period = tonumber(state[3]) or period
  local old_refill = tonumber(state[4]) or refill
  local old_max = tonumber(state[5]) or max_tokens
  local old_tick = math.floor(now / old_period)
  if old_tick > last then
    tokens = math.min(old_max, tokens + (old_tick - last) * old_refill)
  end
  tokens = math.min(tokens, max_tokens)
end
return {tokens, (tick + 1) * period - now}

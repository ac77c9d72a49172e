-- One bucket as the admin view shows it (bucket_take.lua without the take):
-- read only. ARGV[1]: '' for the Redis server's clock (TIME), or a test's
-- time in ms. KEYS[1]: the bucket. ARGV[2..4]: refill_period_ms,
-- refill_tokens, max_tokens. Returns the tokens and ms until the next refill.
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
local state = redis.call('HMGET', KEYS[1], 't', 'k', 'p')
local tokens = tonumber(state[1])
if tokens == nil then
  tokens = max_tokens
elseif tonumber(state[3]) == period and tick > tonumber(state[2]) then
  tokens = math.min(max_tokens, tokens + (tick - tonumber(state[2])) * refill)
end
return {math.min(tokens, max_tokens), (tick + 1) * period - now}

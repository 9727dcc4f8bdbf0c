-- Convert one time-scored sorted set's scores that an earlier version wrote in epoch seconds into the
-- whole microseconds of redis_keys.time_score (speed_layer/migrations.py). A score under `below` is in
-- seconds: any time in microseconds since 1970-01-02 is above it, any in seconds before the year 5000
-- under it, so members written since in microseconds stay as they are.
--
-- KEYS: key
-- ARGV: unit below
--
-- Returns how many members it converted (0: none left).
local unit = tonumber(ARGV[1])
local old = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[2], 'WITHSCORES')
local flat = {}
for i = 1, #old, 2 do
  flat[#flat + 1] = string.format('%d', math.floor(tonumber(old[i + 1]) * unit + 0.5))
  flat[#flat + 1] = old[i]
end
for first = 1, #flat, 1000 do redis.call('ZADD', KEYS[1], unpack(flat, first, math.min(first + 999, #flat))) end
return #old / 2

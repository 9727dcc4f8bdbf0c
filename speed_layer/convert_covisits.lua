-- Convert one item's co-visits kept by an earlier version (float weights) into units of
-- common.sequence.FOLLOW_UNIT, added to the item's row of units, then delete the old row
-- (speed_layer/migrations.py). Both keys carry the item's slot group, so this is one slot.
--
-- KEYS: old new
-- ARGV: unit kept
--
-- A weight was a sum of 1/g, so weight x unit is a whole number of units up to rounding. The row is
-- trimmed to `kept` once it holds twice as many, as the event script trims it. Returns the
-- co-visits converted (0 when the old row is gone: converted already).
local unit, kept = tonumber(ARGV[1]), tonumber(ARGV[2])
local old = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
for i = 1, #old, 2 do
  redis.call('ZINCRBY', KEYS[2], math.floor(tonumber(old[i + 1]) * unit + 0.5), old[i])
end
if redis.call('ZCARD', KEYS[2]) > 2 * kept then redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(kept + 1)) end
redis.call('DEL', KEYS[1])
return #old / 2

-- Move one item's co-visits kept by an earlier version as a sorted set into its hash of the same units
-- (redis_keys.covisitation), added to what this version wrote there meanwhile, then delete the sorted set
-- (speed_layer/migrations.py). Both keys carry the item's slot group, so this is one slot.
--
-- KEYS: old new
--
-- The sorted set was cut to its kept heaviest once it held twice as many, so the hash holds at most
-- its own bound and that; the event script cuts it when the next follower joins. Returns the
-- co-visits moved (0 when the old row is gone: moved already).
local old = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
for i = 1, #old, 2 do
  redis.call('HINCRBY', KEYS[2], old[i], old[i + 1])
end
redis.call('DEL', KEYS[1])
return #old / 2

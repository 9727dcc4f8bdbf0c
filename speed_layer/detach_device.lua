-- Identify on Redis Cluster, the merge's first step (speed_layer/effects.py): detach, in the device's
-- own slot, the device's keys that merge_identity.lua then merges into the user's in the user's slot.
-- Each existing key is kept as its DUMP payload in `stash` under its part name, and deleted, but for
-- the first `kept` parts (the device's markers and plans: until the alias is set, a retry of the
-- device's events must still find them here; the last step deletes them). The stash is the step's marker: a retry gets
-- the same payloads back, whatever the device holds by then.
--
-- KEYS: stash part*parts
-- ARGV: stash_ttl parts kept name*parts
--
-- Returns the stash as a flat list name, payload, ...: a part that did not exist has no entry; the
-- name '' (empty payload) is there even when the device had nothing.
local stash = KEYS[1]
if redis.call('EXISTS', stash) == 0 then
  local flat, kept = {'', ''}, tonumber(ARGV[3])
  for i = 1, tonumber(ARGV[2]) do
    local payload = redis.call('DUMP', KEYS[KEYS_HEAD + i])
    if payload then
      flat[#flat + 1] = ARGV[ARGV_HEAD + i]; flat[#flat + 1] = payload
      if i > kept then redis.call('DEL', KEYS[KEYS_HEAD + i]) end
    end
  end
  redis.call('HSET', stash, unpack(flat))
  redis.call('EXPIRE', stash, ARGV[1])
end
return redis.call('HGETALL', stash)

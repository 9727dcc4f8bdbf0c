-- Identify: move an anonymous device's state into the user's, and alias the device to the user.
--
-- KEYS: seen_user seen_device alias_device sessions_device sessions_user items_device items_user
--       purchases_device purchases_user devices_user plans_device plans_user session*sessions
-- KEYS session: recent_device cats_device cart_device counts_device recent_user cats_user cart_user
--       counts_user clicked_device clicked_user
-- ARGV: user_id history_ttl session_ttl dedup_ttl affinity_half_life identify_mark anonymous_id split
--       restores device_token*sessions restore*restores
-- ARGV restore: key payload
--
-- One `session` block per session of the device; identify_mark is the identify event's marker field.
-- On one Redis (split 0) the device's KEYS are its own keys, and there are no restores. On Redis
-- Cluster a script touches one slot, so the merge is a step of several (speed_layer/effects.py):
-- detach_device.lua took the device's keys as DUMP payloads in its slot; here each `restore` puts one
-- back (key: the 1-based index of a device KEYS, named in the user's slot by redis_keys.identify_scratch)
-- to be merged and deleted as on one Redis; split is 1 (the caller set the alias, a key of its own
-- slot) and alias_device a key of the user's that is not written.
-- clicked: the session's open purchase reward (redis_keys.session_clicked), whose value split (1: Redis
-- Cluster) is another: the served keys of the lists clicked since the last purchase, newest first, at
-- most 20 (apply_events.lua `claim_rewards`); else one served record. device_token: the session's
-- common.neighbours.session_token under the device, the one its clicks took their lists with.
-- Returns 1 when merged, 0 if seen.
if redis.call('ZSCORE', KEYS[1], ARGV[6]) then return 0 end
local history_ttl, session_ttl, half_life = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[5])
local dedup_ttl, now = tonumber(ARGV[4]), tonumber(redis.call('TIME')[1])
local n_sessions = (#KEYS - KEYS_HEAD) / KEYS_SESSION
for r = 0, tonumber(ARGV[9]) - 1 do
  local at = ARGV_HEAD + n_sessions + r * ARGV_RESTORE
  -- Merged and deleted below; the TTL (ms) only bounds a key left behind by a failing write.
  redis.call('RESTORE', KEYS[tonumber(ARGV[at + 1])], 60000, ARGV[at + 2], 'REPLACE')
end
local split = ARGV[8] == '1'
if not split then redis.call('SET', KEYS[3], ARGV[1], 'EX', history_ttl) end
-- The alias's reverse (redis_keys.person_devices): erasure of the user finds the device here.
redis.call('ZADD', KEYS[10], now, ARGV[7])
redis.call('ZREMRANGEBYSCORE', KEYS[10], '-inf', '(' .. (now - history_ttl))
redis.call('EXPIRE', KEYS[10], history_ttl)

local function union_max(from, into, ttl)
  if redis.call('EXISTS', from) == 1 then
    redis.call('ZUNIONSTORE', into, 2, into, from, 'AGGREGATE', 'MAX')
    redis.call('EXPIRE', into, ttl)
    redis.call('DEL', from)
  end
end
local function add_hash(from, into, ttl)
  local fields = redis.call('HGETALL', from)
  for i = 1, #fields, 2 do redis.call('HINCRBYFLOAT', into, fields[i], fields[i + 1]) end
  if #fields > 0 then redis.call('EXPIRE', into, ttl) end
  redis.call('DEL', from)
end
-- Forward-decayed affinities (see apply_events.lua) are rescaled to the target's reference time first.
local function add_affinity(from, into, ttl)
  local from_t0 = tonumber(redis.call('HGET', from, '_t0') or '')
  if not from_t0 then return add_hash(from, into, ttl) end
  local into_t0 = tonumber(redis.call('HGET', into, '_t0') or '')
  if not into_t0 then
    into_t0 = from_t0
    redis.call('HSET', into, '_t0', from_t0)
  end
  local factor = 2 ^ ((from_t0 - into_t0) / half_life)
  local fields = redis.call('HGETALL', from)
  for i = 1, #fields, 2 do
    if fields[i] ~= '_t0' then redis.call('HINCRBYFLOAT', into, fields[i], tonumber(fields[i + 1]) * factor) end
  end
  redis.call('EXPIRE', into, ttl)
  redis.call('DEL', from)
end

-- A list clicked before the login waits for a purchase after it. On one Redis the key holds the last
-- clicked list's record, so the user's (a click since the login) wins. Split, the lists add up, the
-- user's first, as `claim_rewards` keeps them; a device's entry is its served key, a tab and the token
-- that took it (the user's purchase claims it under that token, not its own: effects.py `_global_ops`).
local function add_clicked(from, into, ttl, device_token)
  local device = redis.call('GET', from)
  if not device then return end
  local user = redis.call('GET', into)
  if not split then
    if not user then redis.call('SET', into, device, 'EX', ttl) end
  else
    local taken, kept, listed = {}, {}, {}
    for entry in string.gmatch(device, '[^\n]+') do
      local key = string.match(entry, '^[^\t]*')
      if not taken[key] then
        taken[key] = string.find(entry, '\t', 1, true) and entry or entry .. '\t' .. device_token
      end
    end
    -- A key in both lists was taken by the device's click, if by either (a click after it takes nothing).
    for entry in string.gmatch((user or '') .. '\n' .. device, '[^\n]+') do
      local key = string.match(entry, '^[^\t]*')
      if not listed[key] and #kept < 20 then kept[#kept + 1] = taken[key] or entry; listed[key] = true end
    end
    redis.call('SET', into, table.concat(kept, '\n'), 'EX', ttl)
  end
  redis.call('DEL', from)
end

-- The device's state now counts under the user, so do the markers of the events that made it: a
-- retry of a device event, now resolved to the user, is a duplicate. Its delta markers stay behind
-- (deltas are not merged, so the user's delta has yet to learn those events) and go with the key.
local function carry_marks(from, into)
  local marks = redis.call('ZRANGE', from, 0, -1, 'WITHSCORES')
  local flat = {}
  for i = 1, #marks, 2 do
    if not string.find(marks[i], ':', 1, true) then
      flat[#flat + 1] = marks[i + 1]; flat[#flat + 1] = marks[i]
    end
    if #flat >= 1000 then redis.call('ZADD', into, 'NX', unpack(flat)); flat = {} end  -- bounded unpack
  end
  if #flat > 0 then redis.call('ZADD', into, 'NX', unpack(flat)) end
  redis.call('DEL', from)
end

carry_marks(KEYS[2], KEYS[1])
-- The plans kept beside the markers (Redis Cluster's split path; none on one Redis) go with them: a
-- retry of a device event whose group calls did not all run gets its plan back from the user's.
local plans = redis.call('HGETALL', KEYS[11])
for i = 1, #plans, 2 do redis.call('HSETNX', KEYS[12], plans[i], plans[i + 1]) end
if #plans > 0 then redis.call('EXPIRE', KEYS[12], dedup_ttl) end
redis.call('DEL', KEYS[11])
union_max(KEYS[4], KEYS[5], session_ttl)
add_hash(KEYS[6], KEYS[7], history_ttl)
union_max(KEYS[8], KEYS[9], history_ttl)
for i = 1, n_sessions do
  local base = KEYS_HEAD + (i - 1) * KEYS_SESSION + 1
  union_max(KEYS[base], KEYS[base + 4], session_ttl)
  add_affinity(KEYS[base + 1], KEYS[base + 5], session_ttl)
  add_hash(KEYS[base + 2], KEYS[base + 6], session_ttl)
  add_hash(KEYS[base + 3], KEYS[base + 7], session_ttl)
  add_clicked(KEYS[base + 8], KEYS[base + 9], session_ttl, ARGV[ARGV_HEAD + i])
end
redis.call('ZADD', KEYS[1], now, ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - dedup_ttl))
redis.call('EXPIRE', KEYS[1], dedup_ttl)
return 1

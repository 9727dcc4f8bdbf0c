"""Lua scripts that apply one event's effects atomically with its dedup marker (exactly-once effects).

On one Redis the whole script is atomic, so the dedup decision guards the per-person keys and the
global counters together. On Redis Cluster a script may only touch one slot: the per-person part
(all keys tagged {u:<person>}) stays one script, and the global counters (trending, popularity,
bestsellers, co-visitation) must move to a second script per item slot guarded by its own marker
(e.g. `{i:<item>}:seen:<event_id>`); see speed_layer/README section in the report.
"""

from __future__ import annotations

# KEYS: 1 seen  2 recent  3 cats  4 cart  5 counts  6 sessions  7 person_items  8 purchases
#       9 trend bucket  10 popularity day  11 category bestsellers  12 delta A  13 n A  14 delta B
#       15 n B  16 covis(item)  17.. covis(other) aligned with ARGV[27..]
# ARGV: 1 apply_base  2 event_type  3 item  4 session  5 ts  6 weight  7 quantity  8 category
#       9 version A  10 delta A  11 expected n A  12 version B  13 delta B  14 expected n B
#       15 session_ttl  16 recent_n  17 dedup_ttl  18 affinity_half_life  19 history_ttl
#       20 purchases_kept  21 trend expireat (0: skip)  22 popularity expireat (0: skip)
#       23 bestseller increment (0: skip)  24 bestsellers kept  25 covis kept  26 delta ttl  27.. others
# Returns -1 when a delta's event count moved since the caller read it (nothing applied; re-read and
# retry), else a bit mask of what was applied: 1 version-free effects, 2 delta A, 4 delta B.
APPLY_EVENT = r"""
local seen = KEYS[1]
local version_a, version_b = ARGV[9], ARGV[12]
local need_base = ARGV[1] == '1' and redis.call('HEXISTS', seen, '_') == 0
local need_a = version_a ~= '' and redis.call('HEXISTS', seen, version_a) == 0
local need_b = version_b ~= '' and redis.call('HEXISTS', seen, version_b) == 0
if need_a and tonumber(redis.call('GET', KEYS[13]) or '0') ~= tonumber(ARGV[11]) then return -1 end
if need_b and tonumber(redis.call('GET', KEYS[15]) or '0') ~= tonumber(ARGV[14]) then return -1 end

local function trim(key, keep)
  if redis.call('ZCARD', key) > 2 * keep then redis.call('ZREMRANGEBYRANK', key, 0, -(keep + 1)) end
end

local applied = 0
if need_base then
  local etype, item, session = ARGV[2], ARGV[3], ARGV[4]
  local ts, weight, quantity, category = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8]
  local session_ttl, history_ttl = tonumber(ARGV[15]), tonumber(ARGV[19])

  redis.call('HINCRBY', KEYS[5], etype, 1)
  redis.call('EXPIRE', KEYS[5], session_ttl)
  local last_active = redis.call('ZSCORE', KEYS[6], session)
  if not last_active or tonumber(last_active) < ts then redis.call('ZADD', KEYS[6], ts, session) end
  redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', '(' .. (ts - session_ttl))
  redis.call('EXPIRE', KEYS[6], session_ttl)

  if item ~= '' then
    local previous = redis.call('ZSCORE', KEYS[2], item)
    if etype ~= 'remove_from_cart' then
      if not previous then
        -- A pair counts once, when the item first enters the session (still there: authoritative check).
        local keep = tonumber(ARGV[25])
        for k = 17, #KEYS do
          local other = ARGV[k + 10]
          if other ~= item and redis.call('ZSCORE', KEYS[2], other) then
            redis.call('ZINCRBY', KEYS[16], 1, other)
            redis.call('ZINCRBY', KEYS[k], 1, item)
            trim(KEYS[k], keep)
          end
        end
        trim(KEYS[16], keep)
      end
      if not previous or tonumber(previous) < ts then redis.call('ZADD', KEYS[2], ts, item) end
      redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(tonumber(ARGV[16]) + 1))
      redis.call('EXPIRE', KEYS[2], session_ttl)
    end

    if etype == 'add_to_cart' then
      redis.call('HINCRBY', KEYS[4], item, quantity)
    elseif etype == 'remove_from_cart' then
      if redis.call('HINCRBY', KEYS[4], item, -quantity) <= 0 then redis.call('HDEL', KEYS[4], item) end
    elseif etype == 'purchase' then
      redis.call('HDEL', KEYS[4], item)
      redis.call('ZADD', KEYS[8], ts, item)
      redis.call('ZREMRANGEBYRANK', KEYS[8], 0, -(tonumber(ARGV[20]) + 1))
      redis.call('EXPIRE', KEYS[8], history_ttl)
    end
    redis.call('EXPIRE', KEYS[4], session_ttl)

    if category ~= '' and weight > 0 then
      -- Decay the whole affinity hash to the newest event time; an older event adds a decayed weight.
      local half_life = tonumber(ARGV[18])
      local last = tonumber(redis.call('HGET', KEYS[3], '_ts') or ts)
      if ts > last then
        local factor = 2 ^ (-(ts - last) / half_life)
        local fields = redis.call('HGETALL', KEYS[3])
        for i = 1, #fields, 2 do
          if fields[i] ~= '_ts' then redis.call('HSET', KEYS[3], fields[i], tonumber(fields[i + 1]) * factor) end
        end
        last = ts
      end
      redis.call('HSET', KEYS[3], '_ts', last)
      redis.call('HINCRBYFLOAT', KEYS[3], category, weight * 2 ^ (-(last - ts) / half_life))
      redis.call('EXPIRE', KEYS[3], session_ttl)
    end

    if weight > 0 then
      redis.call('HINCRBYFLOAT', KEYS[7], item, weight)
      redis.call('EXPIRE', KEYS[7], history_ttl)
      if tonumber(ARGV[21]) > 0 then
        redis.call('ZINCRBY', KEYS[9], weight, item)
        redis.call('EXPIREAT', KEYS[9], ARGV[21])
      end
    end
    if tonumber(ARGV[22]) > 0 then
      redis.call('ZINCRBY', KEYS[10], 1, item)
      redis.call('EXPIREAT', KEYS[10], ARGV[22])
    end
    if tonumber(ARGV[23]) > 0 then
      redis.call('ZINCRBY', KEYS[11], ARGV[23], item)
      trim(KEYS[11], tonumber(ARGV[24]))
    end
  end
  redis.call('HSET', seen, '_', 1)
  applied = applied + 1
end

local delta_ttl = ARGV[26]
if need_a then
  redis.call('SET', KEYS[12], ARGV[10], 'EX', delta_ttl)
  redis.call('INCR', KEYS[13])
  redis.call('EXPIRE', KEYS[13], delta_ttl)
  redis.call('HSET', seen, version_a, 1)
  applied = applied + 2
end
if need_b then
  redis.call('SET', KEYS[14], ARGV[13], 'EX', delta_ttl)
  redis.call('INCR', KEYS[15])
  redis.call('EXPIRE', KEYS[15], delta_ttl)
  redis.call('HSET', seen, version_b, 1)
  applied = applied + 4
end
if applied > 0 then redis.call('EXPIRE', seen, ARGV[17]) end
return applied
"""

# Identify: move an anonymous device's state into the user's, and alias the device to the user.
# Crosses two persons' slots, so on Redis Cluster it would run as a copy in the user's slot followed
# by a delete in the device's slot (the dedup marker sits in the user's slot).
# KEYS: 1 seen(user)  2 alias(device)  3 sessions(device)  4 sessions(user)  5 items(device)
#       6 items(user)  7 purchases(device)  8 purchases(user), then per session 4 device keys
#       (recent, cats, cart, counts) followed by the same 4 user keys.
# ARGV: 1 user_id  2 history_ttl  3 session_ttl  4 dedup_ttl.  Returns 1 when merged, 0 if seen.
MERGE_IDENTITY = r"""
if redis.call('HEXISTS', KEYS[1], '_') == 1 then return 0 end
local history_ttl, session_ttl = tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('SET', KEYS[2], ARGV[1], 'EX', history_ttl)

local function union_max(from, into, ttl)
  if redis.call('EXISTS', from) == 1 then
    redis.call('ZUNIONSTORE', into, 2, into, from, 'AGGREGATE', 'MAX')
    redis.call('EXPIRE', into, ttl)
    redis.call('DEL', from)
  end
end
local function add_hash(from, into, ttl)
  local fields = redis.call('HGETALL', from)
  for i = 1, #fields, 2 do
    if fields[i] == '_ts' then
      local mine = tonumber(redis.call('HGET', into, '_ts') or '0')
      if tonumber(fields[i + 1]) > mine then redis.call('HSET', into, '_ts', fields[i + 1]) end
    else
      redis.call('HINCRBYFLOAT', into, fields[i], fields[i + 1])
    end
  end
  if #fields > 0 then redis.call('EXPIRE', into, ttl) end
  redis.call('DEL', from)
end

union_max(KEYS[3], KEYS[4], session_ttl)
add_hash(KEYS[5], KEYS[6], history_ttl)
union_max(KEYS[7], KEYS[8], history_ttl)
for base = 9, #KEYS, 8 do
  union_max(KEYS[base], KEYS[base + 4], session_ttl)
  add_hash(KEYS[base + 1], KEYS[base + 5], session_ttl)
  add_hash(KEYS[base + 2], KEYS[base + 6], session_ttl)
  add_hash(KEYS[base + 3], KEYS[base + 7], session_ttl)
end
redis.call('HSET', KEYS[1], '_', 1)
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""

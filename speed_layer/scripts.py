"""Lua scripts that apply events' effects atomically with their dedup markers (exactly-once effects).

On one Redis the whole script is atomic, so the dedup decision guards the per-person keys and the
global counters together. On Redis Cluster a script may only touch one slot: the per-person part
(all keys tagged {u:<person>}) would stay one script per person, and the global counters
(trending, popularity, bestsellers, co-visitation) would move to a second script per item slot
guarded by its own marker (e.g. `{i:<item>}:seen:<event_id>`).
"""

from __future__ import annotations

# One call applies a chunk of events in order; per event it does what a one-event script would.
# ARGV starts with the chunk's constants:
#   1 event count  2 apply_base (1/0)  3 session_ttl  4 recent_n  5 dedup_ttl  6 affinity_half_life
#   7 history_ttl  8 purchases_kept  9 bestsellers kept  10 covis kept  11 delta ttl
#   12/13 prefix and suffix of a co-visitation key (around the item id)  14 covis window (steps)
#   15/16 prefix and suffix of a neighbour-session key (around the session token)
#   17/18 prefix and suffix of an item's neighbour-sessions key (around the item id)
#   19 neighbour sessions kept per item (0: session-kNN off)  20 neighbour keys' TTL
#   21 nv, the number of model versions whose deltas the chunk updates (0-2)  22.. their names
# then one block per event: EVENT_ARGS fixed values, then two per version:
#   1 event_type  2 item  3 session  4 ts  5 weight  6 quantity  7 category
#   8 trend expireat (0: skip)  9 popularity expireat (0: skip)  10 bestseller increment (0: skip)
#   11 event_id  12 session token (common.neighbours.session_token)
#   per version: the new delta ('' : none for this event) and the event count it replaces.
# KEYS holds one block per event: EVENT_KEYS fixed keys, then two per version:
#   1 seen (the person's dedup markers)  2 recent  3 cats  4 cart  5 counts  6 sessions
#   7 person_items  8 purchases  9 trend bucket  10 popularity day  11 category bestsellers
#   12 covis(item) (declared for Redis Cluster slot planning; the rule writes earlier items' rows)
#   per version: delta, delta count.
# The co-visitation keys of the session's other items are built from the template: which items
# those are is only known here, from the session's live recent items.
# Returns one reply per event, in order: -1 when a delta's event count moved since the caller read
# it (nothing of that event applied; re-read and retry), else a bit mask: 1 version-free effects,
# 2 the first version's delta, 4 the second's (0: a duplicate). An event whose effects raised an
# error gets the error text and ends the list: the events after it were not applied (retry them).
# When some of the chunk's deferred writes failed, the list ends with a one-element list saying
# which (the events are applied; only those keys' shares are lost).
#
# Every write that nothing later in the chunk reads back is deferred and written once per key at
# the end: counters are summed, a delta and its count keep their last value, markers are gathered
# per person (stamped with Redis' clock; those older than dedup_ttl are dropped), sessions keep
# their latest time, TTLs are set once. Events of one person and one session come in runs, so this
# turns ~20 commands per event into ~10, and a command inside a script costs more than the work it does.
CHUNK_CONSTANTS = 21
EVENT_ARGS = 12
EVENT_KEYS = 12
APPLY_EVENTS = r"""
local n_events, apply_base = tonumber(ARGV[1]), ARGV[2] == '1'
local session_ttl, recent_n, dedup_ttl = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local half_life, history_ttl, purchases_kept = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local best_kept, covis_kept, delta_ttl = tonumber(ARGV[9]), tonumber(ARGV[10]), ARGV[11]
local covis_prefix, covis_suffix, covis_window = ARGV[12], ARGV[13], tonumber(ARGV[14])
local nb_session_prefix, nb_session_suffix = ARGV[15], ARGV[16]
local nb_item_prefix, nb_item_suffix = ARGV[17], ARGV[18]
local nb_kept, nb_ttl = tonumber(ARGV[19]), tonumber(ARGV[20])
local n_versions = tonumber(ARGV[21])
local versions = {}
for v = 1, n_versions do versions[v] = ARGV[21 + v] end
local event_args, event_keys = tonumber('EVENT_ARGS') + 2 * n_versions, tonumber('EVENT_KEYS') + 2 * n_versions
local now = tonumber(redis.call('TIME')[1])

-- Deferred writes. zincr/hincr/hcount: key -> member -> increment; zset: key -> member -> score (the
-- last one written wins); expire_in/expire_at: key -> TTL / unix time; trims: key -> members kept
-- (when twice as many); recent_trims: per-session sorted sets cut to their recent_n newest.
local zincr, hincr, hcount, zset, expire_in, expire_at, trims, recent_trims = {}, {}, {}, {}, {}, {}, {}, {}
-- Read-through state of this chunk: marks set (seen key -> field -> true), delta counts and values,
-- sessions' latest times ({key, session, written, latest}), affinity reference times.
local marks_now, counts, count_dirty, deltas, sessions_now, cats_t0 = {}, {}, {}, {}, {}, {}
local function add(map, key, member, by)
  local t = map[key]
  if not t then t = {}; map[key] = t end
  t[member] = (t[member] or 0) + by
end

-- Ordered co-visitation (common/sequence.py is the definition): a new item in the session is
-- added to the rows of the session's `covis_window` latest other items, the g-th latest by 1/g.
local function covisit(recent, item)
  local gap = 0
  for _, other in ipairs(redis.call('ZREVRANGE', recent, 0, covis_window)) do
    if other ~= item and gap < covis_window then
      gap = gap + 1
      local other_key = covis_prefix .. other .. covis_suffix
      add(zincr, other_key, item, 1 / gap)
      trims[other_key] = covis_kept
    end
  end
end

-- Session-kNN's index (common/neighbours.py reads it the same way): the session's new item joins the
-- session's neighbour set, and the session joins the item's most recent sessions.
local function index_neighbour(token, item, ts)
  local session_key = nb_session_prefix .. token .. nb_session_suffix
  local item_key = nb_item_prefix .. item .. nb_item_suffix
  local t = zset[session_key] or {}; zset[session_key] = t; t[item] = ts
  t = zset[item_key] or {}; zset[item_key] = t; t[token] = ts
  recent_trims[session_key] = true
  trims[item_key] = nb_kept
  expire_in[session_key] = nb_ttl
  expire_in[item_key] = nb_ttl
end

-- The session's latest activity; a session new to the person also drops the person's expired ones.
local function touch_session(sessions, session, ts)
  local id = sessions .. '\0' .. session
  local known = sessions_now[id]
  if known then
    if ts > known[4] then known[4] = ts end
  else
    if redis.call('ZADD', sessions, 'GT', ts, session) == 1 then
      redis.call('ZREMRANGEBYSCORE', sessions, '-inf', '(' .. (ts - session_ttl))
    end
    sessions_now[id] = {sessions, session, ts, ts}
  end
  expire_in[sessions] = session_ttl
end

-- Forward decay: weights are stored scaled by 2^((ts - _t0) / half_life), so an event adds to one
-- field instead of re-decaying them all; readers only compare categories of one session.
local function add_affinity(cats, category, weight, ts)
  local t0 = cats_t0[cats]
  if not t0 then
    t0 = tonumber(redis.call('HGET', cats, '_t0') or '')
    if not t0 then
      t0 = ts
      redis.call('HSET', cats, '_t0', ts)
    end
  end
  if (ts - t0) / half_life > 64 then  -- a day-long session: rebase before the scale overflows
    local pending = hincr[cats] or {}
    hincr[cats] = nil
    local shrink = 2 ^ (-(ts - t0) / half_life)
    local fields = redis.call('HGETALL', cats)
    for i = 1, #fields, 2 do
      local name = fields[i]
      if name ~= '_t0' then
        redis.call('HSET', cats, name, (tonumber(fields[i + 1]) + (pending[name] or 0)) * shrink)
        pending[name] = nil
      end
    end
    for name, by in pairs(pending) do redis.call('HSET', cats, name, by * shrink) end
    t0 = ts
    redis.call('HSET', cats, '_t0', ts)
  end
  cats_t0[cats] = t0
  add(hincr, cats, category, weight * 2 ^ ((ts - t0) / half_life))
  expire_in[cats] = session_ttl
end

-- k, a: the offsets just before this event's blocks, so KEYS[k + i] and ARGV[a + i] are field i.
local function apply_base_effects(k, a)
  local etype, item, session = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  local ts, weight, quantity, category = tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6]), ARGV[a + 7]

  add(hcount, KEYS[k + 5], etype, 1)
  expire_in[KEYS[k + 5]] = session_ttl
  touch_session(KEYS[k + 6], session, ts)
  if item == '' then return end

  if etype ~= 'remove_from_cart' then
    local recent = KEYS[k + 2]
    if redis.call('ZADD', recent, 'GT', ts, item) == 1 then
      covisit(recent, item)
      recent_trims[recent] = true
      if nb_kept > 0 then index_neighbour(ARGV[a + 12], item, ts) end
    end
    expire_in[recent] = session_ttl
  end

  local cart, purchases = KEYS[k + 4], KEYS[k + 8]
  if etype == 'add_to_cart' then
    redis.call('HINCRBY', cart, item, quantity)
  elseif etype == 'remove_from_cart' then
    if redis.call('HINCRBY', cart, item, -quantity) <= 0 then redis.call('HDEL', cart, item) end
  elseif etype == 'purchase' then
    redis.call('HDEL', cart, item)
    redis.call('ZADD', purchases, ts, item)
    redis.call('ZREMRANGEBYRANK', purchases, 0, -(purchases_kept + 1))
    expire_in[purchases] = history_ttl
  end
  expire_in[cart] = session_ttl

  if category ~= '' and weight > 0 then add_affinity(KEYS[k + 3], category, weight, ts) end

  if weight > 0 then
    add(hincr, KEYS[k + 7], item, weight)
    expire_in[KEYS[k + 7]] = history_ttl
    if tonumber(ARGV[a + 8]) > 0 then
      add(zincr, KEYS[k + 9], item, weight)
      expire_at[KEYS[k + 9]] = ARGV[a + 8]
    end
  end
  if tonumber(ARGV[a + 9]) > 0 then
    add(zincr, KEYS[k + 10], item, 1)
    expire_at[KEYS[k + 10]] = ARGV[a + 9]
  end
  local best = tonumber(ARGV[a + 10])
  if best > 0 then
    add(zincr, KEYS[k + 11], item, best)
    trims[KEYS[k + 11]] = best_kept
  end
end

-- The delta count the event was planned on, read once per chunk and then followed here.
local function delta_count(count_key)
  local n = counts[count_key]
  if n == nil then
    n = tonumber(redis.call('GET', count_key) or '0')
    counts[count_key] = n
  end
  return n
end

local function apply_event(k, a)
  local seen, event_id = KEYS[k + 1], ARGV[a + 11]
  local fields = {event_id}
  for v = 1, n_versions do fields[v + 1] = event_id .. ':' .. versions[v] end
  local marks = redis.call('ZMSCORE', seen, unpack(fields))
  local set_now = marks_now[seen] or {}
  local need_base = apply_base and not marks[1] and not set_now[fields[1]]
  local need = {}
  for v = 1, n_versions do
    local delta_at, count_key = a + tonumber('EVENT_ARGS') + 2 * v - 1, KEYS[k + tonumber('EVENT_KEYS') + 2 * v]
    need[v] = ARGV[delta_at] ~= '' and not marks[v + 1] and not set_now[fields[v + 1]]
    if need[v] and delta_count(count_key) ~= tonumber(ARGV[delta_at + 1]) then return -1 end
  end

  local applied, marked = 0, {}
  if need_base then
    apply_base_effects(k, a)
    marked[1] = fields[1]
    applied = applied + 1
  end
  for v = 1, n_versions do
    if need[v] then
      local delta_key, count_key = KEYS[k + tonumber('EVENT_KEYS') + 2 * v - 1], KEYS[k + tonumber('EVENT_KEYS') + 2 * v]
      deltas[delta_key] = ARGV[a + tonumber('EVENT_ARGS') + 2 * v - 1]
      counts[count_key] = counts[count_key] + 1
      count_dirty[count_key] = true
      marked[#marked + 1] = fields[v + 1]
      applied = applied + 2 ^ v
    end
  end
  if applied > 0 then
    for _, field in ipairs(marked) do set_now[field] = true end
    marks_now[seen] = set_now
    expire_in[seen] = dedup_ttl
  end
  return applied
end

local results = {}
local k, a = 0, tonumber('CHUNK_CONSTANTS') + n_versions
for e = 1, n_events do
  local ok, reply = pcall(apply_event, k, a)
  if not ok then  -- keep what the earlier events did (their markers are set): flush, then stop here
    results[e] = 'effects failed: ' .. (type(reply) == 'table' and (reply.err or '?') or tostring(reply))
    break
  end
  results[e] = reply
  k = k + event_keys
  a = a + event_args
end

-- The deferred writes. The events are applied now (their markers are among these writes), so a
-- write that fails (a key of the wrong type) must not stop the others: it is reported after the
-- events' replies, and that key's share is lost rather than the chunk counted twice on a retry.
local flush_errors = {}
local function write(...)
  local reply = redis.pcall(...)
  if type(reply) == 'table' and reply.err then flush_errors[#flush_errors + 1] = reply.err end
  return reply
end
for key, set_now in pairs(marks_now) do
  local flat = {}
  for field in pairs(set_now) do flat[#flat + 1] = now; flat[#flat + 1] = field end
  write('ZADD', key, unpack(flat))
  write('ZREMRANGEBYSCORE', key, '-inf', '(' .. (now - dedup_ttl))
end
for key, members in pairs(zincr) do
  for member, by in pairs(members) do write('ZINCRBY', key, by, member) end
end
for key, members in pairs(zset) do
  for member, score in pairs(members) do write('ZADD', key, score, member) end
end
for key, members in pairs(hincr) do
  for member, by in pairs(members) do write('HINCRBYFLOAT', key, member, by) end
end
for key, members in pairs(hcount) do
  for member, by in pairs(members) do write('HINCRBY', key, member, by) end
end
for _, s in pairs(sessions_now) do
  if s[4] > s[3] then write('ZADD', s[1], 'GT', s[4], s[2]) end
end
for key in pairs(recent_trims) do write('ZREMRANGEBYRANK', key, 0, -(recent_n + 1)) end
for key, keep in pairs(trims) do
  local size = write('ZCARD', key)
  if type(size) == 'number' and size > 2 * keep then write('ZREMRANGEBYRANK', key, 0, -(keep + 1)) end
end
for key, value in pairs(deltas) do write('SET', key, value, 'EX', delta_ttl) end
for key in pairs(count_dirty) do write('SET', key, counts[key], 'EX', delta_ttl) end
for key, ttl in pairs(expire_in) do write('EXPIRE', key, ttl) end
for key, at in pairs(expire_at) do write('EXPIREAT', key, at) end
if #flush_errors > 0 then
  results[#results + 1] = {'deferred writes failed: ' .. table.concat(flush_errors, '; ', 1, math.min(#flush_errors, 5))}
end
return results
"""
for _name, _value in (
    ("CHUNK_CONSTANTS", CHUNK_CONSTANTS),
    ("EVENT_KEYS", EVENT_KEYS),
    ("EVENT_ARGS", EVENT_ARGS),
):
    APPLY_EVENTS = APPLY_EVENTS.replace(f"tonumber('{_name}')", str(_value))

# Identify: move an anonymous device's state into the user's, and alias the device to the user.
# Crosses two persons' slots, so on Redis Cluster it would run as a copy in the user's slot followed
# by a delete in the device's slot (the identify's own marker sits in the user's slot).
# KEYS: 1 seen(user)  2 seen(device)  3 alias(device)  4 sessions(device)  5 sessions(user)  6 items(device)
#       7 items(user)  8 purchases(device)  9 purchases(user)  10 devices(user), then per session 4 device
#       keys (recent, cats, cart, counts) followed by the same 4 user keys.
# ARGV: 1 user_id  2 history_ttl  3 session_ttl  4 dedup_ttl  5 affinity_half_life  6 the event's marker field
#       7 anonymous_id.
# Returns 1 when merged, 0 if seen.
MERGE_IDENTITY = r"""
if redis.call('ZSCORE', KEYS[1], ARGV[6]) then return 0 end
local history_ttl, session_ttl, half_life = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[5])
local dedup_ttl, now = tonumber(ARGV[4]), tonumber(redis.call('TIME')[1])
redis.call('SET', KEYS[3], ARGV[1], 'EX', history_ttl)
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
-- Forward-decayed affinities (see APPLY_EVENTS) are rescaled to the target's reference time first.
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
union_max(KEYS[4], KEYS[5], session_ttl)
add_hash(KEYS[6], KEYS[7], history_ttl)
union_max(KEYS[8], KEYS[9], history_ttl)
for base = 11, #KEYS, 8 do
  union_max(KEYS[base], KEYS[base + 4], session_ttl)
  add_affinity(KEYS[base + 1], KEYS[base + 5], session_ttl)
  add_hash(KEYS[base + 2], KEYS[base + 6], session_ttl)
  add_hash(KEYS[base + 3], KEYS[base + 7], session_ttl)
end
redis.call('ZADD', KEYS[1], now, ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - dedup_ttl))
redis.call('EXPIRE', KEYS[1], dedup_ttl)
return 1
"""

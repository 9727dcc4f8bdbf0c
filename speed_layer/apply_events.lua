-- Apply a chunk of events in order, each with its dedup markers, as a one-event script would
-- (speed_layer/effects.py plans them; speed_layer/scripts.py says why one script).
--
-- KEYS: trend_versions holder*holder_count event*event_count
-- KEYS holder: seen recent cats cart counts sessions person_items purchases plans clicked per_version*n_versions
-- KEYS per_version: delta delta_count
-- KEYS event: trend_bucket popularity_day category_bestsellers
-- ARGV: event_count apply_base session_ttl recent_n dedup_ttl affinity_half_life history_ttl purchases_kept
--       bestsellers_kept covis_kept delta_ttl covis_prefix covis_suffix covis_window nb_session_prefix
--       nb_session_suffix nb_item_prefix nb_item_suffix nb_kept nb_ttl split n_groups covis_middle
--       nb_session_middle nb_item_middle covis_unit time_unit channel changes_head changes_tail holder_count
--       n_versions version*n_versions holder*holder_count event*event_count
-- ARGV holder: session session_token personal
-- ARGV event: holder event_type item ts weight quantity category trend_expireat popularity_expireat
--       bestseller_increment event_id served announcement per_version*n_versions
-- ARGV per_version: delta delta_count
--
-- A holder is one person's session in the call: the keys and values its events share, named once (a
-- session's events come in runs, and each argument costs both sides of the call about as much as the
-- work it names). An event's `holder` is its holder's position, from 1.
--
-- apply_base: 1 or 0 (a version-switch replay writes deltas only). covis_*: the co-visitation key
-- around an item id; nb_session_*: a neighbour-session key around a session token; nb_item_*: an
-- item's neighbour-sessions key around the item id; each is prefix .. group(id) .. middle .. id ..
-- suffix, group the id's slot group out of n_groups (redis_keys.grouped_template); nb_kept: sessions kept per item (0: session-kNN
-- off). n_versions (0-2): the model versions whose deltas the chunk updates, named by `version`.
-- Per event: ts, the event's time as the time-scored sets keep it (redis_keys.time_score: 1/time_unit s);
-- trend_expireat, popularity_expireat, bestseller_increment (the text `0`: skip that counter).
-- Per holder: session_token is common.neighbours.session_token; personal: 1 when its events have
-- personalisation consent, 0 when they update the aggregates (trending, popularity, bestsellers) only:
-- then its keys are all the unlinked marker set (redis_keys.SEEN_UNLINKED), of which only `seen` is
-- touched, and its events carry no delta (the call's events without consent share one such holder).
-- served: the served-list record key (redis_keys.bandit_served) of the event's rec_request_id, '' without
-- one; clicked: the session's clicked-list key (redis_keys.session_clicked).
-- trend_versions: redis_keys.TRENDING_VERSIONS, where each event counted in a trending bucket is counted
-- (speed_layer/trending.py reads a bucket again only once its count moved); split, the person's `seen`.
-- announcement: '' for an event that changes no one's list; else, on a person's first such event in the
-- call, the change of their last one as RecsChangedBatch lists it, and `1` on their others. The call
-- announces on `channel`, in one message, the change of each person any of whose such events it
-- applied, joined between changes_head and changes_tail (common/messages.py): as the effects are
-- written, not once the consumer reads the reply (it plans the next batch meanwhile), and once (a
-- duplicate applies nothing). A version switch's replay announces nothing: the switch itself changes
-- every list. Should an event's effects fail, the events after it wait for a retry, which announces
-- them again. Split, the announcement precedes the event's global effects (the next call's): a list
-- computed in between lacks its counters' and co-visits' share.
-- Per version the new delta ('': none for this event) and the delta count it replaces. The co-visit
-- rows an event writes are its session's earlier items' (the rule writes their rows), which only the
-- session's live recent items say: their keys are built here from the template, as the session-kNN
-- ones are, and split they are apply_globals.lua's, in their own slots.
-- split: 1 where the keys of no person are written by apply_globals.lua, one call per slot group
-- (Redis Cluster: a script touches one slot). Then this script applies the person's effects only
-- (every KEYS of the call is in the person's slot; the declared global ones are not touched) and
-- returns, per applied event, {mask, plan}: plan the global effects the person's state gave it ('' none;
-- else '+', the holder's session token (the session-kNN keys it indexes: a delivery after the device's
-- login plans the user's), then, each after a '\0', the session's earlier items it co-visits, nearest
-- first; then, for a purchase that claims the bandit's purchase reward, '\1' and the served records it
-- claims, see
-- `claim_rewards`), kept in `plans` beside its marker so a duplicate gets the same plan back (effects.py
-- applies it per group, the rewards in the served records' group).
-- Returns one reply per event, in order: -1 when a delta's event count moved since the caller read
-- it (nothing of that event applied; re-read and retry), else a bit mask: 1 version-free effects,
-- 2 the first version's delta, 4 the second's (0: a duplicate). An event whose effects raised an
-- error gets the error text and ends the list: the events after it were not applied (retry them).
-- When some of the chunk's deferred writes failed, the list ends with a one-element list saying
-- which (the events are applied; only those keys' shares are lost).
--
-- Every write that nothing later in the chunk reads back is deferred and written once per key at
-- the end: counters are summed, a delta and its count keep their last value, markers are gathered
-- per person (stamped with Redis' clock; those older than dedup_ttl are dropped), sessions keep
-- their latest time, TTLs are set once. Events of one person and one session come in runs, so this
-- turns ~20 commands per event into ~10, and a command inside a script costs more than the work it does.
local n_events, apply_base = tonumber(ARGV[1]), ARGV[2] == '1'
local session_ttl, recent_n, dedup_ttl = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local half_life, history_ttl, purchases_kept = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local best_kept, covis_kept, delta_ttl = tonumber(ARGV[9]), tonumber(ARGV[10]), ARGV[11]
local covis_prefix, covis_suffix, covis_window = ARGV[12], ARGV[13], tonumber(ARGV[14])
local covis_window_text = ARGV[14]  -- as given: ZREVRANGE's argument (see `arg`)
local nb_session_prefix, nb_session_suffix = ARGV[15], ARGV[16]
local nb_item_prefix, nb_item_suffix = ARGV[17], ARGV[18]
local nb_kept, nb_ttl = tonumber(ARGV[19]), tonumber(ARGV[20])
local split, n_groups = ARGV[21] == '1', tonumber(ARGV[22])
local covis_middle, nb_session_middle, nb_item_middle = ARGV[23], ARGV[24], ARGV[25]
local covis_unit = tonumber(ARGV[26])
local time_unit = tonumber(ARGV[27])  -- an event's time is given in 1/time_unit s (redis_keys.time_score)
local channel, changes_head, changes_tail = ARGV[28], ARGV[29], ARGV[30]
-- The TTLs as given (see `expiry`).
local session_ttl_text, dedup_ttl_text, history_ttl_text, nb_ttl_text = ARGV[3], ARGV[5], ARGV[7], ARGV[20]
local holder_count, n_versions = tonumber(ARGV[ARGV_HEAD - 1]), tonumber(ARGV[ARGV_HEAD])
local versions = {}
for v = 1, n_versions do versions[v] = ARGV[ARGV_HEAD + v] end
local holder_keys = KEYS_HOLDER + KEYS_PER_VERSION * n_versions
local event_args = ARGV_EVENT + ARGV_PER_VERSION * n_versions
local trend_versions = KEYS[1]
local now_text, now_us = unpack(redis.call('TIME'))
local now = tonumber(now_text)
-- A TTL as the time it ends, in ms of Redis' clock, for PEXPIREAT and SET's PXAT. Redis rewrites every
-- EXPIRE, and SET's EX, into those forms for replication (a command lookup and a new argument each:
-- ~25 % of an EXPIRE, 2 % of a browsing event's instructions); each TTL's time is formatted once a call.
local now_ms = now * 1000 + math.floor(tonumber(now_us) / 1000)
local expiry_of = {}
local function expiry(ttl_text)
  local at = expiry_of[ttl_text]
  if not at then
    at = string.format('%d', now_ms + tonumber(ttl_text) * 1000)
    expiry_of[ttl_text] = at
  end
  return at
end

-- A number as a command's argument. Redis writes a Lua number out with "%.17g", and that and parsing
-- it back took a sixth of the script's time; a whole number is written as an integer instead (the
-- same value: under 2^52 a double holds every integer). Times are passed on as the text they came in
-- (`ts_text`), for the same reason.
-- Small whole numbers (counts, mostly 1) are written once a call.
local small_text = {}
local function arg(v)
  if v % 1 == 0 and v > -4503599627370496 and v < 4503599627370496 then
    if v >= 0 and v < 256 then
      local text = small_text[v]
      if not text then text = string.format('%d', v); small_text[v] = text end
      return text
    end
    return string.format('%d', v)
  end
  return v
end

-- Deferred writes. zincr/hincr/hcount: key -> member -> increment; zset: key -> member -> score (the
-- last one written wins); expire_in/expire_at: key -> TTL / unix time (texts); trims: key -> members kept
-- (when twice as many); recent_trims: per-session sorted sets cut to their recent_n newest; covis_rows:
-- co-visit hash -> follower -> whole units, each cut to covis_kept once it holds twice as many.
local zincr, hincr, hcount, zset, expire_in, expire_at, trims, recent_trims = {}, {}, {}, {}, {}, {}, {}, {}
local covis_rows = {}
-- Read-through state of this chunk: marks set (seen key -> field -> true), delta counts and values,
-- sessions' latest times ({key, session, written, latest}), affinity reference times.
local marks_now, counts, count_dirty, deltas, sessions_now, cats_t0 = {}, {}, {}, {}, {}, {}
-- Split only: plans set now (plans key -> event id -> plan), each seen key's plans key, and the plan
-- of the event being applied ({item newly in the session, the items it co-visits}).
local plans_now, plans_of_seen, plan = {}, {}, nil
local claims = nil  -- split: the served records the event's purchase claims ('\n'-separated), or nil
local function add(map, key, member, by)
  local t = map[key]
  if not t then t = {}; map[key] = t end
  t[member] = (t[member] or 0) + by
end

-- Each slot group's digits, made once: a number joined into a string is formatted by sprintf("%.14g").
local group_text = {}
for g = 0, n_groups - 1 do group_text[g] = string.format('%d', g) end

-- An id's key in its slot group, remembered for the call in `made` (one table a key family), as is the
-- id's group: a session's items come back in every later event's co-visits, a SHA-1 costs more than
-- the write it names, and joining five strings makes a new one to hash.
local groups = {}
local function grouped(made, prefix, middle, suffix, id)
  local key = made[id]
  if key then return key end
  local group = groups[id]
  if not group then
    group = group_text[tonumber(string.sub(redis.sha1hex(id), 1, 8), 16) % n_groups]
    groups[id] = group
  end
  key = prefix .. group .. middle .. id .. suffix
  made[id] = key
  return key
end
local covis_keys, item_session_keys = {}, {}  -- `grouped`'s keys: co-visit rows, items' neighbour sessions
local session_keys = {}  -- a session's neighbour key by its token, made once a call likewise

-- Ordered co-visitation (common/sequence.py is the definition): a new item in the session is
-- added to the rows of the session's `covis_window` latest other items, the g-th latest by 1/g,
-- counted in whole units (covis_unit / g is an integer for every g up to the window).
-- Returns how many of the session's newest items it read (covis_window + 1 at most).
local function covisit(recent, item)
  local gap = 0
  local newest = redis.call('ZREVRANGE', recent, '0', covis_window_text)
  for _, other in ipairs(newest) do
    if other ~= item and gap < covis_window then
      gap = gap + 1
      if split then
        plan[#plan + 1] = other
      else
        local other_key = grouped(covis_keys, covis_prefix, covis_middle, covis_suffix, other)
        add(covis_rows, other_key, item, covis_unit / gap)
      end
    end
  end
  return #newest
end

-- Session-kNN's index (common/neighbours.py reads it the same way): the session's new item joins the
-- session's neighbour set, and the session joins the item's most recent sessions.
local function index_neighbour(token, item, ts_text)
  -- A token is a SHA-1's hex digits already: its own first 32 bits name its group (redis_keys.token_group).
  local session_key = session_keys[token]
  if not session_key then
    session_key = nb_session_prefix .. group_text[tonumber(string.sub(token, 1, 8), 16) % n_groups]
      .. nb_session_middle .. token .. nb_session_suffix
    session_keys[token] = session_key
  end
  local item_key = grouped(item_session_keys, nb_item_prefix, nb_item_middle, nb_item_suffix, item)
  local t = zset[session_key] or {}; zset[session_key] = t; t[item] = ts_text
  t = zset[item_key] or {}; zset[item_key] = t; t[token] = ts_text
  recent_trims[session_key] = true
  trims[item_key] = nb_kept
  expire_in[session_key] = nb_ttl_text
  expire_in[item_key] = nb_ttl_text
end

-- The session's latest activity; a session new to the person also drops the person's expired ones.
-- ts: the event time as its score (redis_keys.time_score), ts_text that number as given.
local function touch_session(sessions, session, ts, ts_text)
  local id = sessions .. '\0' .. session
  local known = sessions_now[id]
  if known then
    if ts > known[4] then known[4], known[5] = ts, ts_text end
  else
    if redis.call('ZADD', sessions, 'GT', ts_text, session) == 1 then
      redis.call('ZREMRANGEBYSCORE', sessions, '-inf', '(' .. arg(ts - session_ttl * time_unit))
    end
    sessions_now[id] = {sessions, session, ts, ts, ts_text}  -- key, session, time written, latest time and its text
  end
  expire_in[sessions] = session_ttl_text
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
  expire_in[cats] = session_ttl_text
end

-- The offsets just before an event's blocks are k and a (its KEYS and ARGV), hk and ha (its holder's):
-- KEYS[k + i] is the event's KEYS field i, ARGV[ha + i] its holder's ARGV field i, and so on.
-- The session's and the person's state (co-visits and session-kNN too: they follow the session's items).
local function apply_person_effects(hk, ha, a, weight)
  local etype, item, session = ARGV[a + 2], ARGV[a + 3], ARGV[ha + 1]
  local ts_text, category = ARGV[a + 4], ARGV[a + 7]
  local ts_score = tonumber(ts_text)

  add(hcount, KEYS[hk + 5], etype, 1)
  expire_in[KEYS[hk + 5]] = session_ttl_text
  touch_session(KEYS[hk + 6], session, ts_score, ts_text)
  if item == '' then return end

  if etype ~= 'remove_from_cart' then
    local recent = KEYS[hk + 2]
    if redis.call('ZADD', recent, 'GT', ts_text, item) == 1 then
      if split then plan = {} end
      -- Fewer than covis_window + 1 read is the whole set: then it is cut only when over recent_n.
      local read = covisit(recent, item)
      if read > covis_window or read > recent_n then recent_trims[recent] = true end
      if nb_kept > 0 and not split then index_neighbour(ARGV[ha + 2], item, ts_text) end
    end
    expire_in[recent] = session_ttl_text
  end

  local cart, purchases = KEYS[hk + 4], KEYS[hk + 8]
  if etype == 'add_to_cart' then
    redis.call('HINCRBY', cart, item, ARGV[a + 6])
  elseif etype == 'remove_from_cart' then
    if redis.call('HINCRBY', cart, item, -tonumber(ARGV[a + 6])) <= 0 then redis.call('HDEL', cart, item) end
  elseif etype == 'purchase' then
    redis.call('HDEL', cart, item)
    redis.call('ZADD', purchases, ts_text, item)
    redis.call('ZREMRANGEBYRANK', purchases, '0', arg(-(purchases_kept + 1)))
    expire_in[purchases] = history_ttl_text
  end
  expire_in[cart] = session_ttl_text

  if category ~= '' and weight > 0 then add_affinity(KEYS[hk + 3], category, weight, ts_score / time_unit) end

  if weight > 0 then
    add(hincr, KEYS[hk + 7], item, weight)
    expire_in[KEYS[hk + 7]] = history_ttl_text
  end
end

-- The counters of items, linked to no one: trending, popularity per day, category bestsellers.
local function apply_aggregates(k, a, weight)
  local item = ARGV[a + 3]
  if weight > 0 and ARGV[a + 8] ~= '0' then
    add(zincr, KEYS[k + 1], item, weight)
    expire_at[KEYS[k + 1]] = ARGV[a + 8]
    add(zincr, trend_versions, KEYS[k + 1], 1)  -- the bucket's count of events (speed_layer/trending.py)
  end
  if ARGV[a + 9] ~= '0' then
    add(zincr, KEYS[k + 2], item, 1)
    expire_at[KEYS[k + 2]] = ARGV[a + 9]
  end
  if ARGV[a + 10] ~= '0' then
    local best = tonumber(ARGV[a + 10])
    add(zincr, KEYS[k + 3], item, best)
    trims[KEYS[k + 3]] = best_kept
  end
end

-- The bandit's rewards (common/bandit.py; the record is bandit.served_record: counts key, click field,
-- purchase field). The first event naming a served list takes its record, so a list earns one click
-- reward; the record then waits in the session (person-level state: with personalisation only) for a
-- purchase, which takes it for the purchase reward.
local function apply_bandit(hk, ha, a)
  local served_key, personal, clicked_key = ARGV[a + 12], ARGV[ha + 3] == '1', KEYS[hk + 10]
  if served_key ~= '' then
    local served = redis.call('GET', served_key)
    if served then
      redis.call('DEL', served_key)
      local counts, click = string.match(served, '^([^\n]*)\n([^\n]*)\n')
      if counts then add(hcount, counts, click, 1) end
      if personal then redis.call('SET', clicked_key, served, 'EX', session_ttl) end
    end
  end
  if personal and ARGV[a + 2] == 'purchase' then
    local clicked = redis.call('GET', clicked_key)
    if clicked then
      redis.call('DEL', clicked_key)
      local counts, purchase = string.match(clicked, '^([^\n]*)\n[^\n]*\n([^\n]*)$')
      if counts then add(hcount, counts, purchase, 1) end
    end
  end
end

-- Split: the rewards are counted where the served records are (apply_globals.lua's take and claim), and
-- which list a purchase rewards is only known there. Here the session keeps (in `clicked`) the records
-- of the lists it clicked since its last purchase, by first click, newest first, at most 20; a purchase
-- takes them as its claims.
local function claim_rewards(hk, ha, a)
  local served_key, clicked_key = ARGV[a + 12], KEYS[hk + 10]
  if ARGV[ha + 3] ~= '1' then return end
  if served_key ~= '' then
    local clicked = redis.call('GET', clicked_key) or ''
    local listed = '\n' .. clicked .. '\n'  -- an entry merged from a device is the key, a tab, a token
    if not (string.find(listed, '\n' .. served_key .. '\n', 1, true) or string.find(listed, '\n' .. served_key .. '\t', 1, true)) then
      local kept = {served_key}
      for key in string.gmatch(clicked, '[^\n]+') do
        if #kept < 20 then kept[#kept + 1] = key end
      end
      clicked = table.concat(kept, '\n')
    end
    redis.call('SET', clicked_key, clicked, 'EX', session_ttl)
  end
  if ARGV[a + 2] == 'purchase' then
    claims = redis.call('GET', clicked_key) or nil
    if claims then redis.call('DEL', clicked_key) end
  end
end

local function apply_base_effects(hk, ha, k, a)
  local weight = tonumber(ARGV[a + 5])
  if ARGV[ha + 3] == '1' then apply_person_effects(hk, ha, a, weight) end
  if ARGV[a + 3] ~= '' and not split then apply_aggregates(k, a, weight) end
  if split then claim_rewards(hk, ha, a) else apply_bandit(hk, ha, a) end
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

-- The offsets just before version v's values in a holder's KEYS and an event's ARGV (delta, then
-- delta_count).
local function version_keys(hk, v) return hk + KEYS_HOLDER + KEYS_PER_VERSION * (v - 1) end
local function version_args(a, v) return a + ARGV_EVENT + ARGV_PER_VERSION * (v - 1) end

local function apply_event(hk, ha, k, a)
  local seen, event_id = KEYS[hk + 1], ARGV[a + 11]
  local fields = {event_id}
  for v = 1, n_versions do fields[v + 1] = event_id .. ':' .. versions[v] end
  local marks = redis.call('ZMSCORE', seen, unpack(fields))
  local set_now = marks_now[seen] or {}
  local need_base = apply_base and not marks[1] and not set_now[fields[1]]
  local need = {}
  for v = 1, n_versions do
    local delta_at, count_key = version_args(a, v) + 1, KEYS[version_keys(hk, v) + 2]
    need[v] = ARGV[delta_at] ~= '' and not marks[v + 1] and not set_now[fields[v + 1]]
    if need[v] and delta_count(count_key) ~= tonumber(ARGV[delta_at + 1]) then return -1 end
  end

  local applied, marked = 0, {}
  plan, claims = nil, nil
  if need_base then
    apply_base_effects(hk, ha, k, a)
    marked[1] = fields[1]
    applied = applied + 1
  end
  for v = 1, n_versions do
    if need[v] then
      local delta_key, count_key = KEYS[version_keys(hk, v) + 1], KEYS[version_keys(hk, v) + 2]
      deltas[delta_key] = ARGV[version_args(a, v) + 1]
      counts[count_key] = counts[count_key] + 1
      count_dirty[count_key] = true
      marked[#marked + 1] = fields[v + 1]
      applied = applied + 2 ^ v
    end
  end
  if applied > 0 then
    for _, field in ipairs(marked) do set_now[field] = true end
    marks_now[seen] = set_now
    expire_in[seen] = dedup_ttl_text
  end
  if not split then return applied end
  local plans = KEYS[hk + 9]
  local stored = plans_now[plans] or {}
  plans_now[plans], plans_of_seen[seen] = stored, plans
  local text
  if need_base then
    text = ''
    if plan then text = '+' .. ARGV[ha + 2] .. (#plan > 0 and '\0' .. table.concat(plan, '\0') or '') end
    if claims then text = text .. '\1' .. claims end
    if text ~= '' then stored[event_id] = text end
  else  -- applied before (or earlier in this chunk): the plan it was given then
    text = stored[event_id] or redis.call('HGET', plans, event_id) or ''
  end
  return {applied, text}
end

local results = {}
-- The changes to announce: each person's (their seen key's) change, and the people who had one applied,
-- in the order they came.
local change_of, announcing = {}, {}
-- The offsets just before holder h's blocks are holders_k + holder_keys * h and holders_a + ARGV_HOLDER * h.
local holders_k, holders_a = KEYS_HEAD - holder_keys, ARGV_HEAD + n_versions - ARGV_HOLDER
local k, a = holders_k + holder_keys * (holder_count + 1), holders_a + ARGV_HOLDER * (holder_count + 1)
for e = 1, n_events do
  local holder = tonumber(ARGV[a + 1])
  local hk = holders_k + holder_keys * holder
  local ok, reply = pcall(apply_event, hk, holders_a + ARGV_HOLDER * holder, k, a)
  if not ok then  -- keep what the earlier events did (their markers are set): flush, then stop here
    results[e] = 'effects failed: ' .. (type(reply) == 'table' and (reply.err or '?') or tostring(reply))
    break
  end
  results[e] = reply
  local announcement = ARGV[a + 13]
  if apply_base and announcement ~= '' then
    local person = KEYS[hk + 1]
    if announcement ~= '1' then change_of[person] = announcement end
    if change_of[person] ~= true and (type(reply) == 'table' and reply[1] or reply) > 0 then
      announcing[#announcing + 1] = change_of[person]
      change_of[person] = true  -- announced: the person's later events add nothing
    end
  end
  k = k + KEYS_EVENT
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
local markers_expired = '(' .. arg(now - dedup_ttl)  -- the bound of the markers older than dedup_ttl
for key, set_now in pairs(marks_now) do
  local flat = {}
  for field in pairs(set_now) do flat[#flat + 1] = now_text; flat[#flat + 1] = field end
  write('ZADD', key, unpack(flat))
  local plans = plans_of_seen[key]
  if plans then  -- a plan goes with its event's marker
    local old = redis.call('ZRANGEBYSCORE', key, '-inf', markers_expired)
    for i = 1, #old, 1000 do write('HDEL', plans, unpack(old, i, math.min(i + 999, #old))) end
  end
  write('ZREMRANGEBYSCORE', key, '-inf', markers_expired)
end
for key, stored in pairs(plans_now) do
  local flat = {}
  for field, text in pairs(stored) do flat[#flat + 1] = field; flat[#flat + 1] = text end
  if #flat > 0 then
    write('HSET', key, unpack(flat))
    expire_in[key] = dedup_ttl_text
  end
end
-- A key's increments in two commands (its current scores, then one ZADD) rather than one each:
-- trending and popularity take most of a chunk's items. The sums are ZINCRBY's (doubles, exactly).
-- grown: the keys a member joined. Only those can have passed their trim's bound: a key is cut back
-- whenever a write takes it over, so one that gained no member is still under it, and needs no ZCARD.
local grown = {}
for key, members in pairs(zincr) do
  local names = {}
  for member in pairs(members) do names[#names + 1] = member end
  if #names == 1 then
    local by = members[names[1]]
    -- Increments are positive, so a score equal to the increment is a member that was absent (or one so
    -- small that the sum rounds to it: then the key is checked for nothing).
    if tonumber(write('ZINCRBY', key, arg(by), names[1])) == by then grown[key] = true end
  else
    local scores = write('ZMSCORE', key, unpack(names))
    if type(scores) == 'table' and not scores.err then
      local flat = {}
      for i, member in ipairs(names) do
        if not scores[i] then grown[key] = true end
        flat[2 * i - 1] = arg((tonumber(scores[i]) or 0) + members[member])
        flat[2 * i] = member
      end
      write('ZADD', key, unpack(flat))
    end
  end
end
for key, members in pairs(zset) do
  local flat = {}
  for member, score in pairs(members) do flat[#flat + 1] = score; flat[#flat + 1] = member end
  local added = write('ZADD', key, unpack(flat))
  if type(added) ~= 'number' or added > 0 then grown[key] = true end
end
-- A hash's increments likewise, in two commands when it has several: a person's items and a session's
-- categories take a few members each from a session's events in a row (9.64 -> 8.53 commands an
-- event). A float's sum is a double here, a long double in HINCRBYFLOAT: its last digit may differ.
-- Returns whether a member joined the hash (a float's single increment says nothing: false).
local function add_to_hash(key, members, increment)
  local names = {}
  for member in pairs(members) do names[#names + 1] = member end
  if #names == 1 then
    local by = members[names[1]]
    return write(increment, key, names[1], arg(by)) == by  -- HINCRBY's reply is the sum: by when new
  end
  local values = write('HMGET', key, unpack(names))
  if type(values) ~= 'table' or values.err then return false end
  local flat, joined = {}, false
  for i, member in ipairs(names) do
    if not values[i] then joined = true end
    flat[2 * i - 1] = member
    flat[2 * i] = arg((tonumber(values[i]) or 0) + members[member])
  end
  write('HSET', key, unpack(flat))
  return joined
end
for key, members in pairs(hincr) do add_to_hash(key, members, 'HINCRBYFLOAT') end
for key, members in pairs(hcount) do
  for member, by in pairs(members) do write('HINCRBY', key, member, arg(by)) end
end
-- The co-visit rows' whole units; a row a follower joined is cut to its covis_kept heaviest once it
-- holds twice as many (ties: the greater member stays, compared as Lua compares strings), so a row's
-- cut costs a read of it once every covis_kept new followers. apply_globals.lua cuts the same way.
for key, members in pairs(covis_rows) do
  local size = add_to_hash(key, members, 'HINCRBY') and write('HLEN', key)
  if type(size) == 'number' and size > 2 * covis_kept then
    local flat, row = write('HGETALL', key), {}
    for i = 1, #flat, 2 do row[#row + 1] = {tonumber(flat[i + 1]), flat[i]} end
    table.sort(row, function(a, b) return a[1] > b[1] or (a[1] == b[1] and a[2] > b[2]) end)
    local cut = {}
    for i = covis_kept + 1, #row do cut[#cut + 1] = row[i][2] end
    write('HDEL', key, unpack(cut))
  end
end
for _, s in pairs(sessions_now) do
  if s[4] > s[3] then write('ZADD', s[1], 'GT', s[5], s[2]) end
end
local recent_last = arg(-(recent_n + 1))
for key in pairs(recent_trims) do write('ZREMRANGEBYRANK', key, '0', recent_last) end
for key, keep in pairs(trims) do
  if grown[key] then
    local size = write('ZCARD', key)
    if type(size) == 'number' and size > 2 * keep then write('ZREMRANGEBYRANK', key, '0', arg(-(keep + 1))) end
  end
end
local delta_expiry = expiry(delta_ttl)
for key, value in pairs(deltas) do write('SET', key, value, 'PXAT', delta_expiry) end
for key in pairs(count_dirty) do write('SET', key, arg(counts[key]), 'PXAT', delta_expiry) end
for key, ttl_text in pairs(expire_in) do write('PEXPIREAT', key, expiry(ttl_text)) end
-- An expiry time is fixed per key (its bucket's or day's end), so only a key a member joined can be
-- new and without it: two EXPIREATs an event fewer where batches hold one event.
for key, at in pairs(expire_at) do
  if grown[key] then write('EXPIREAT', key, at) end
end
if #announcing > 0 then
  write('PUBLISH', channel, changes_head .. table.concat(announcing, ',') .. changes_tail)
end
if #flush_errors > 0 then
  results[#results + 1] = {'deferred writes failed: ' .. table.concat(flush_errors, '; ', 1, math.min(#flush_errors, 5))}
end
return results

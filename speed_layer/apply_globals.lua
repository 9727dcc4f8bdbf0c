-- Apply the global effects of a batch's events that fall in one slot group, each event once: the
-- group's own dedup marker per event (redis_keys.group_seen) is written with its effects, so a retry
-- after a crash between an event's calls (its person's script, then one call per group) applies in
-- each group exactly what is not there yet (speed_layer/effects.py plans the operations).
--
-- KEYS: seen key*key_count
-- ARGV: key_count event_count op_count dedup_ttl event_id*event_count op*op_count
-- ARGV op: event kind key member value
--
-- op: event is the 1-based index of its event; key the 1-based index among the `key` KEYS; kind one of
-- zincr (ZINCRBY by value, summed per key and member), zadd (score value; the last one wins),
-- hincr (a co-visit hash's HINCRBY by value, summed likewise), hcut (a co-visit hash cut to the value's
-- heaviest members once a member joined it and it holds twice as many, as apply_events.lua cuts it),
-- trim (cut to the value's top members once it holds twice as many), keep (cut to the value's top
-- members), expire (TTL value), expireat (unix time value), take and claim (the bandit's rewards, in
-- the order given; key: a served record, redis_keys.bandit_served; member: the session's
-- neighbours.session_token, '' without personalisation): take is a click on the list (value: the
-- session TTL): the first counts the click reward and, with a token, marks the record as the session's
-- for that long (else deletes it); claim is a purchase claiming the list: the event's first claimed
-- record marked as its session's counts the purchase reward, and every one so marked goes. Both count
-- in the hash the record names (the record's slot group). member '' where the kind takes none.
-- Returns per event 1 (applied now) or 0 (its marker was there: a duplicate), then, if some writes
-- failed (a key of the wrong type), a one-element list saying which (the events are marked applied).
local n_events, n_ops, dedup_ttl = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local seen = KEYS[1]
local now = tonumber(redis.call('TIME')[1])

local ids, marks = {}, {}
for e = 1, n_events do ids[e] = ARGV[ARGV_HEAD + e] end
for first = 1, n_events, 1000 do
  local part = redis.call('ZMSCORE', seen, unpack(ids, first, math.min(first + 999, n_events)))
  for i, mark in ipairs(part) do marks[first + i - 1] = mark end
end
local apply, replies, fresh, flat = {}, {}, {}, {}
for e = 1, n_events do
  local id = ids[e]
  if marks[e] or fresh[id] then
    replies[e] = 0
  else
    apply[e], fresh[id], replies[e] = true, true, 1
    flat[#flat + 1] = now; flat[#flat + 1] = id
  end
end

local zincr, hincr, zset, trims, cuts, keeps, expire_in, expire_at, rewards = {}, {}, {}, {}, {}, {}, {}, {}, {}
local function member_map(map, key)
  local t = map[key]
  if not t then t = {}; map[key] = t end
  return t
end
local base = ARGV_HEAD + n_events
for o = 0, n_ops - 1 do
  local at = base + o * ARGV_OP
  if apply[tonumber(ARGV[at + 1])] then
    local kind, key, member, value = ARGV[at + 2], KEYS[1 + tonumber(ARGV[at + 3])], ARGV[at + 4], ARGV[at + 5]
    if kind == 'zincr' then
      local t = member_map(zincr, key); t[member] = (t[member] or 0) + tonumber(value)
    elseif kind == 'hincr' then
      local t = member_map(hincr, key); t[member] = (t[member] or 0) + tonumber(value)
    elseif kind == 'hcut' then cuts[key] = tonumber(value)
    elseif kind == 'zadd' then
      member_map(zset, key)[member] = value
    elseif kind == 'trim' then trims[key] = tonumber(value)
    elseif kind == 'keep' then keeps[key] = tonumber(value)
    elseif kind == 'expire' then expire_in[key] = value
    elseif kind == 'expireat' then expire_at[key] = value
    elseif kind == 'take' or kind == 'claim' then rewards[#rewards + 1] = {ARGV[at + 1], kind, key, member, value}
    else error('unknown op kind ' .. kind) end
  end
end

-- The markers first: once the events count as applied, a failing write loses only its own share
-- rather than a retry counting the others twice (as apply_events.lua does).
if #flat > 0 then
  for first = 1, #flat, 2000 do redis.call('ZADD', seen, unpack(flat, first, math.min(first + 1999, #flat))) end
  redis.call('ZREMRANGEBYSCORE', seen, '-inf', '(' .. (now - dedup_ttl))
  redis.call('EXPIRE', seen, dedup_ttl)
end
local errors = {}
local function write(...)
  local reply = redis.pcall(...)
  if type(reply) == 'table' and reply.err then errors[#errors + 1] = reply.err end
  return reply
end
for key, members in pairs(zincr) do
  for member, by in pairs(members) do write('ZINCRBY', key, by, member) end
end
for key, members in pairs(zset) do
  for member, score in pairs(members) do write('ZADD', key, score, member) end
end
for key, members in pairs(hincr) do
  local joined = false
  for member, by in pairs(members) do
    if write('HINCRBY', key, member, string.format('%d', by)) == by then joined = true end
  end
  local size, keep = joined and write('HLEN', key), cuts[key]
  if keep and type(size) == 'number' and size > 2 * keep then
    local flat, row = write('HGETALL', key), {}
    for i = 1, #flat, 2 do row[#row + 1] = {tonumber(flat[i + 1]), flat[i]} end
    table.sort(row, function(a, b) return a[1] > b[1] or (a[1] == b[1] and a[2] > b[2]) end)
    local cut = {}
    for i = keep + 1, #row do cut[#cut + 1] = row[i][2] end
    write('HDEL', key, unpack(cut))
  end
end
for key, keep in pairs(keeps) do write('ZREMRANGEBYRANK', key, 0, -(keep + 1)) end
for key, keep in pairs(trims) do
  local size = write('ZCARD', key)
  if type(size) == 'number' and size > 2 * keep then write('ZREMRANGEBYRANK', key, 0, -(keep + 1)) end
end
-- The rewards, in order (apply_events.lua's apply_bandit is the one-script rule). A record is
-- "<counts key>\n<click field>\n<purchase field>", then "\n<token>" once taken by a session.
local rewarded = {}
for _, r in ipairs(rewards) do
  local event, kind, key, token = r[1], r[2], r[3], r[4]
  local record = write('GET', key)
  local counts, click, purchase, taker
  if type(record) == 'string' then
    counts, click, purchase, taker = string.match(record, '^([^\n]*)\n([^\n]*)\n([^\n]*)\n?(.*)$')
  end
  if counts and kind == 'take' and taker == '' then
    write('HINCRBY', counts, click, 1)
    if token ~= '' then write('SET', key, record .. '\n' .. token, 'EX', r[5]) else write('DEL', key) end
  elseif counts and kind == 'claim' and taker ~= '' and taker == token then
    if not rewarded[event] then write('HINCRBY', counts, purchase, 1) end
    rewarded[event] = true
    write('DEL', key)
  end
end
for key, ttl in pairs(expire_in) do write('EXPIRE', key, ttl) end
for key, at in pairs(expire_at) do write('EXPIREAT', key, at) end
if #errors > 0 then
  replies[#replies + 1] = {'global writes failed: ' .. table.concat(errors, '; ', 1, math.min(#errors, 5))}
end
return replies

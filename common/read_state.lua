-- Serving's read of one person's speed state (common/speed_state.py): gathers what depends on earlier
-- answers (the alias, the latest session, the session's items and preferred categories) without more
-- round trips. Key names come from redis_keys as prefix/suffix templates, so common/redis_keys.py
-- stays the only place that spells them.
--
-- KEYS: alias person_sessions person_items purchases delta delta_count speed_version
-- ARGV: session covis_n bestsellers_n top_categories recent_prefix recent_suffix
--       cats_prefix cats_suffix cart_prefix cart_suffix counts_prefix counts_suffix covis_prefix
--       covis_suffix bestsellers_prefix bestsellers_suffix nb_session_prefix nb_session_suffix
--       nb_item_prefix nb_item_suffix person neighbour_sample neighbour_k neighbour_n covis_items_given
--       neighbour_per_item n_groups covis_middle bestsellers_middle nb_session_middle nb_item_middle
--       covis_item*covis_items category*categories
--
-- session: '' for the person's latest. covis_items_given: how many covis_item values follow, or -1
-- for the session's own items (then none follow). neighbour_n: 0 turns session neighbours off;
-- neighbour_per_item: each seed's newest sessions read. category: explicit categories, read beside
-- the session's top_categories preferred ones. The global keys are tagged by their id's slot group
-- (redis_keys.grouped_template): <family>_prefix .. group(id) .. <family>_middle .. id .. <family>_suffix.
-- Returns: alias, session, recent, cats, cart, counts, person items, purchases, delta, delta count,
-- speed version, {item, covis}..., {category, bestsellers}..., neighbours (items, best first:
-- common/neighbours.py scores the same way), their scores (little-endian doubles, packed). The item
-- flags come from read_flags.lua, in the same round trip.
-- Lua's incremental collector would run several times inside one read, marking this read's growing
-- tables (~1,600 votes) again each time; paused, the read's garbage is swept once, after it (-2.6 % of
-- a read's instructions on real clicks). Redis' own collection steps between scripts resume it even
-- if a call below raises.
collectgarbage('stop')
local n_groups = tonumber(ARGV[27])
-- Arguments of redis.call go as strings: Redis formats a number argument with %.17g on each call.
local function last(n) return tostring(tonumber(n) - 1) end  -- the last index of n values
local group_of = {}  -- id -> its slot group as text: a seed names a covis and an item_sessions key, one sha1 for both
local function grouped(at, middle_at, id)
  local group = group_of[id]
  if group == nil then
    group = tostring(tonumber(string.sub(redis.sha1hex(id), 1, 8), 16) % n_groups)
    group_of[id] = group
  end
  return ARGV[at] .. group .. ARGV[middle_at] .. id .. ARGV[at + 1]
end
-- A session token's key (redis_keys.token_group): the token is a SHA-1's hex digits already.
-- Each group's digits made once: a number joined into a string is formatted by sprintf("%.14g").
local group_text = {}
for g = 0, n_groups - 1 do group_text[g] = string.format('%d', g) end
-- Locals in the loops over a read's hundreds of candidate sessions: each `redis.call`, `string.sub`,
-- `math.sqrt` or `ARGV[i]` there is a table lookup (the tables themselves are locals: common/lua.py).
local call, sub, sqrt = redis.call, string.sub, math.sqrt
local session_prefix, session_middle, session_suffix = ARGV[17], ARGV[30], ARGV[18]
local function token_grouped(token)
  return session_prefix .. group_text[tonumber(sub(token, 1, 8), 16) % n_groups] .. session_middle .. token .. session_suffix
end
-- The person's strings in one call: alias, delta, delta count, speed version.
local strings = redis.call('MGET', KEYS[1], KEYS[5], KEYS[6], KEYS[7])
local alias = strings[1]
local session = ARGV[1]
if session == '' then session = redis.call('ZREVRANGE', KEYS[2], '0', '0')[1] or false end
local function session_key(i)
  return ARGV[3 + 2 * i] .. session .. ARGV[4 + 2 * i]
end
local recent, cats, cart, counts = {}, {}, {}, {}
if session then
  recent = redis.call('ZRANGE', session_key(1), '0', '-1', 'WITHSCORES')
  cats = redis.call('HGETALL', session_key(2))
  cart = redis.call('HGETALL', session_key(3))
  counts = redis.call('HGETALL', session_key(4))
end

-- covis_n is the caller's: a co-visit row is a hash, read whole (at most twice covis_n) and cut there.
local n_items = tonumber(ARGV[25])
local seeds = {}
if n_items < 0 then
  for i = 1, #recent, 2 do seeds[#seeds + 1] = recent[i] end
else
  for i = 1, n_items do seeds[#seeds + 1] = ARGV[ARGV_HEAD + i] end
end
local covis = {}
for _, item in ipairs(seeds) do
  covis[#covis + 1] = {item, redis.call('HGETALL', grouped(13, 28, item))}
end

local wanted, chosen = {}, {}
for i = ARGV_HEAD + 1 + math.max(n_items, 0), #ARGV do
  if not chosen[ARGV[i]] then chosen[ARGV[i]] = true; wanted[#wanted + 1] = ARGV[i] end
end
local preferred = {}
for i = 1, #cats, 2 do
  local weight = tonumber(cats[i + 1])
  if string.sub(cats[i], 1, 1) ~= '_' and weight and weight > 0 then preferred[#preferred + 1] = {cats[i], weight} end
end
table.sort(preferred, function(x, y) return x[2] > y[2] end)
for i = 1, math.min(tonumber(ARGV[4]), #preferred) do
  local category = preferred[i][1]
  if not chosen[category] then chosen[category] = true; wanted[#wanted + 1] = category end
end
local best, best_last = {}, last(ARGV[3])
for _, category in ipairs(wanted) do
  best[#best + 1] = {category, redis.call('ZREVRANGE', grouped(15, 29, category), '0', best_last, 'WITHSCORES')}
end

-- Session neighbours of the session's recent items (common/neighbours.py is the definition).
-- `names` by value, highest first, ties by name. table.sort with a Lua comparator calls it ~n log n
-- times; here the distinct values and a tie's names sort with Lua's own < (C), and names map back
-- through their value.
local function by_value(names, value)
  local values, named, n_values = {}, {}, 0
  for i = 1, #names do
    local name = names[i]
    local v = value[name]
    local held = named[v]
    if held == nil then
      n_values = n_values + 1; values[n_values] = v; named[v] = name
    elseif type(held) == 'table' then
      held[#held + 1] = name
    else
      named[v] = {held, name}
    end
  end
  table.sort(values)
  local out, n = {}, 0
  for i = n_values, 1, -1 do
    local held = named[values[i]]
    if type(held) == 'table' then
      table.sort(held)
      for j = 1, #held do n = n + 1; out[n] = held[j] end
    else
      n = n + 1; out[n] = held
    end
  end
  return out
end
-- The n-th highest of the values of `names` (n <= #names): the least of a min-heap holding the n highest
-- seen, ~#names comparisons where a sort takes ~#names log #names.
local function nth_highest(names, value, n)
  local heap, size = {}, 0
  for i = 1, #names do
    local v = value[names[i]]
    if size < n then  -- sift v up from the new last place
      size = size + 1
      local at = size
      while at > 1 do
        local up = (at - at % 2) / 2
        if heap[up] <= v then break end
        heap[at] = heap[up]; at = up
      end
      heap[at] = v
    elseif v > heap[1] then  -- v replaces the least: sift it down from the root
      local at = 1
      while true do
        local down = 2 * at
        if down > size then break end
        if down < size and heap[down + 1] < heap[down] then down = down + 1 end
        if heap[down] >= v then break end
        heap[at] = heap[down]; at = down
      end
      heap[at] = v
    end
  end
  return heap[1]
end
-- The first n names of `names` in by_value order, in no particular order: the n-th highest
-- value bounds them; those over it, then the names tied at it, by name. A sort with a Lua comparator
-- calls it ~n log n times (145 us for 150 names here, milliseconds for the thousands of a popular
-- item's sessions). Loops here are numeric: in Lua 5.1 each step of ipairs is a C call and `#t` a search.
local function first_n(names, value, n)
  if #names <= n then return names end
  if n <= 0 then return {} end
  local bound = nth_highest(names, value, n)
  local kept, n_kept, tied = {}, 0, {}
  for i = 1, #names do
    local name = names[i]
    local v = value[name]
    if v > bound then n_kept = n_kept + 1; kept[n_kept] = name elseif v == bound then tied[#tied + 1] = name end
  end
  table.sort(tied)
  for i = 1, n - n_kept do kept[n_kept + i] = tied[i] end
  return kept
end
local neighbours, neighbour_scores = {}, ''
local nb_n = tonumber(ARGV[24])
if nb_n > 0 and session and #recent > 0 then
  local size, at, ordered, is_seed = #recent / 2, {}, {}, {}
  for i = 1, #recent, 2 do
    at[recent[i]] = tonumber(recent[i + 1]); ordered[#ordered + 1] = recent[i]; is_seed[recent[i]] = true
  end
  ordered = by_value(ordered, at)
  local own, sample, per_item_last = string.sub(redis.sha1hex(ARGV[21] .. '\0' .. session), 1, 16), tonumber(ARGV[22]), last(ARGV[26])
  -- The seeds' candidate sessions, in first-seen order, with their dot products; with `timed` also each
  -- one's latest time under the seeds (the rows read WITHSCORES).
  local function candidate_sessions(timed)
    local latest, dot, candidates, n = {}, {}, {}, 0
    for rank, seed in ipairs(ordered) do
      local weight = (size - rank + 1) / size
      local row
      if timed then
        row = redis.call('ZREVRANGE', grouped(19, 31, seed), '0', per_item_last, 'WITHSCORES')
      else
        row = redis.call('ZREVRANGE', grouped(19, 31, seed), '0', per_item_last)
      end
      for i = 1, #row, timed and 2 or 1 do
        local token = row[i]
        if token ~= own then
          local d = dot[token]
          if d == nil then n = n + 1; candidates[n] = token; d = 0 end
          dot[token] = d + weight
          if timed then
            local t = tonumber(row[i + 1])
            if latest[token] == nil or t > latest[token] then latest[token] = t end
          end
        end
      end
    end
    return candidates, dot, latest
  end
  -- Times only order the candidates for the sample's cut: when all of them fit, every one is read and
  -- the order of reading changes nothing, so the rows come without scores (Redis formats each as
  -- text for the script) and only a cut reads them again with them.
  local candidates, dot = candidate_sessions(false)
  if #candidates > sample then
    local latest
    candidates, dot, latest = candidate_sessions(true)
    candidates = first_n(candidates, latest, sample)  -- which ones, not their order, decides the rest
  end
  -- A similarity needs a session's size only: with more candidates than k, their sizes pick the k
  -- nearest and only those sessions' items are read (a popular item's hundreds are not).
  local k = tonumber(ARGV[23])
  local read_all = #candidates <= k
  local similarity, members, key_of, nearest, n_nearest = {}, {}, {}, {}, 0
  for c = 1, #candidates do
    local token = candidates[c]
    local key = token_grouped(token)
    local count
    if read_all then
      members[token] = call('ZRANGE', key, '0', '-1')
      count = #members[token]
    else
      count = call('ZCARD', key)
      key_of[token] = key  -- the nearest are read below: their keys are not built twice
    end
    if count > 0 then
      similarity[token] = dot[token] / sqrt(size * count)
      n_nearest = n_nearest + 1; nearest[n_nearest] = token
    end
  end
  -- In order: the votes are summed nearest first, as common/neighbours.py sums them.
  nearest = first_n(nearest, similarity, k)
  nearest = by_value(nearest, similarity)
  local scores, listed, n_listed = {}, {}, 0
  for t = 1, #nearest do
    local token = nearest[t]
    local vote = similarity[token]
    local items = members[token] or call('ZRANGE', key_of[token], '0', '-1')
    for i = 1, #items do
      local item = items[i]
      if not is_seed[item] then
        local sum = scores[item]
        if sum == nil then n_listed = n_listed + 1; listed[n_listed] = item; sum = 0 end
        scores[item] = sum + vote
      end
    end
  end
  listed = first_n(listed, scores, nb_n)
  listed = by_value(listed, scores)
  local packed = {}
  for i = 1, math.min(nb_n, #listed) do
    neighbours[i] = listed[i]
    packed[i] = struct.pack('<d', scores[listed[i]])  -- exact, and cheaper than formatting it as text
  end
  neighbour_scores = table.concat(packed)
end

collectgarbage('restart')
return {
  alias, session, recent, cats, cart, counts,
  redis.call('HGETALL', KEYS[3]), redis.call('ZRANGE', KEYS[4], '0', '-1', 'WITHSCORES'),
  strings[2], strings[3], strings[4], covis, best, neighbours, neighbour_scores,
}

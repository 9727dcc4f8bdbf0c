-- Trim the event stream by age (common/stream.py appends, then runs this in the same pipeline).
--
-- KEYS: stream
-- ARGV: retention_ms
--
-- Entry ids are the server's clock in ms, so "older than the retention" is "below now - retention"
-- in id order. No entry a consumer group still needs goes: for each group, its oldest pending
-- (delivered, unacknowledged) entry, or, with none pending, the last one delivered to it (everything
-- after is undelivered). With no group, age alone decides. MINID ~ frees whole radix-tree nodes only:
-- cheap, and never more.
local function before(a, b)
  local a_ms, a_seq = string.match(a, '^(%d+)-(%d+)$')
  local b_ms, b_seq = string.match(b, '^(%d+)-(%d+)$')
  a_ms, b_ms = tonumber(a_ms), tonumber(b_ms)
  if a_ms ~= b_ms then return a_ms < b_ms end
  return tonumber(a_seq) < tonumber(b_seq)
end

local now = redis.call('TIME')
local bound = string.format('%d-0', tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - tonumber(ARGV[1]))
for _, flat in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local group = {}
  for i = 1, #flat, 2 do group[flat[i]] = flat[i + 1] end
  local needed = group['last-delivered-id']
  if group['pending'] > 0 then
    needed = redis.call('XPENDING', KEYS[1], group['name'])[2]
  end
  if before(needed, bound) then bound = needed end
end
return redis.call('XTRIM', KEYS[1], 'MINID', '~', bound)

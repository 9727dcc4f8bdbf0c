-- Remove from a consumer group every member but the caller that is idle past a time and holds no
-- pending entry; returns their names (common/stream.py remove_idle_consumers).
--
-- KEYS: stream
-- ARGV: group idle_ms caller
--
-- One script, so no member can read an entry between the check and XGROUP DELCONSUMER, which would
-- drop that entry from the group's pending list. A live member that merely waited is recreated by
-- its next read.
local group, idle_ms, caller = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local removed = {}
for _, flat in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], group)) do
  local member = {}
  for i = 1, #flat, 2 do member[flat[i]] = flat[i + 1] end
  if member['name'] ~= caller and member['pending'] == 0 and member['idle'] >= idle_ms then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], group, member['name'])
    removed[#removed + 1] = member['name']
  end
end
return removed

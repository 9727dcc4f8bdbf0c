-- Count served lists of the bandit (serving/core/experiments.py `Bandit.record` appends them), each once.
--
-- KEYS: stream
-- ARGV: group ttl entry_count entry*entry_count
-- ARGV entry: id counts field
--
-- An entry is counted only by the call that acknowledges it: XACK answers 1 once per entry and group,
-- so an entry read again (a consumer died after reading it and another claimed it) is not counted
-- twice, and one whose count was lost never is acknowledged. counts: the experiment's count hash
-- (redis_keys.bandit_counts, named by the entry: its key depends on the serving side's arm set; in the
-- stream's slot group, so on Redis Cluster this one call may touch it); ttl:
-- the hash expires this long after its last impression; '' for an entry that names none (acknowledged
-- only). Returns how many entries were counted.
local stream, group, ttl, n = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3])
local counted, touched = 0, {}
for i = 0, n - 1 do
  local at = ARGV_HEAD + ARGV_ENTRY * i
  if redis.call('XACK', stream, group, ARGV[at + 1]) == 1 and ARGV[at + 2] ~= '' then
    redis.call('HINCRBY', ARGV[at + 2], ARGV[at + 3], 1)
    touched[ARGV[at + 2]] = true
    counted = counted + 1
  end
end
for key in pairs(touched) do redis.call('EXPIRE', key, ttl) end
return counted

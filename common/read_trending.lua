-- The trending list (common/speed_state.py, TrendingCopy): TRENDING_TOP's n best, sent only when the
-- list changed since the copy the caller holds. Every write of the list writes a fresh token with it,
-- in one transaction (speed_layer/trending.py), so a token names one content of the list.
--
-- KEYS: token top
-- ARGV: known n
--
-- known: the token of the caller's copy ('' for none, or for a copy of fewer than n). Returns {token}
-- when it is the token, else {token, the n best WITHSCORES}; token is nil while none was ever written
-- (then always the list).
local token = redis.call('GET', KEYS[1])
if token and token == ARGV[1] then return {token} end
local n = tonumber(ARGV[2])
if n <= 0 then return {token, {}} end  -- ZREVRANGE's last index -1 would be the whole set
return {token, redis.call('ZREVRANGE', KEYS[2], '0', tostring(n - 1), 'WITHSCORES')}

-- The live item flags (common/speed_state.py, ItemFlagsCopy): the out-of-stock and promoted sets, sent
-- only when they changed since the copy the caller holds. Every write of the sets writes a fresh token
-- after them (common/catalog_state.py), so a token names one content of both sets.
--
-- KEYS: token out_of_stock promoted
-- ARGV: known
--
-- known: the token of the caller's copy ('' for none). Returns {token} when it is the token, else
-- {token, out of stock, promoted}; token is nil while none was ever written (then always the sets).
local token = redis.call('GET', KEYS[1])
if token and token == ARGV[1] then return {token} end
return {token, redis.call('SMEMBERS', KEYS[2]), redis.call('SMEMBERS', KEYS[3])}

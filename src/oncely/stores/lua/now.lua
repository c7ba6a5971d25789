-- now.lua: the server's clock, routed by a record's key (on a cluster, that key's node).
--
-- KEYS[1]  a record hash (only for routing; not read)
--
-- Replies now_ms as a decimal string: what claim.lua reports as now_ms.
local t = redis.call('TIME')
return string.format('%.0f', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))

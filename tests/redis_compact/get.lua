-- get.lua: read one live record.
--
-- KEYS[1]  the record hash
--
-- Replies {st, fe, fp, lu, ea, ca, rs, cd}, or nil when there is no live record (a record whose
-- expires_at passed is gone for every reader, even in the millisecond before Redis drops it).
--#include record.lua
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local h = redis.call('HMGET', KEYS[1], 'st', 'fe', 'fp', 'lu', 'ea', 'ca', 'rs', 'cd', 'rn', 'ft',
  'fx')
if (h[1] ~= 'in_progress' and h[1] ~= 'completed' and not compact(h[1])) or not h[2]
    or (tonumber(h[5]) or 0) <= now_ms then
  return false
end
h = record(KEYS[1], h)
if not h[3] then
  return false
end
return h

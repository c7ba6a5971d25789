-- probe.lua: is the record still in_progress under this fence? (used by watch)
--
-- KEYS[1]  the record hash
-- ARGV[1]  fence
--
-- Replies the milliseconds left on the holder's lease (at least 1) while the record is live,
-- in_progress and under this fence; otherwise -1 (completed, released, deleted, re-claimed,
-- expired, or the lease ran out so a claim would take the key over).
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local h = redis.call('HMGET', KEYS[1], 'st', 'fe', 'lu', 'ea')
if h[1] ~= 'in_progress' or h[2] ~= ARGV[1] or tonumber(h[4] or 0) <= now_ms then
  return -1
end
local left = tonumber(h[3] or 0) - now_ms
if left <= 0 then
  return -1
end
return left

-- release.lua: give the caller's claim up and wake waiters.
--
-- KEYS[1]  the record hash
-- ARGV[1]  fence      ARGV[2] the done channel "<prefix>:done:<scope>:<digest>"
-- ARGV[3]  how long the tombstone stays (ms)
--
-- Only an in_progress record under this very fence may be released. The record becomes a
-- tombstone (status 'released', expired, hidden from every reader, taken over by any claim) for
-- ARGV[3] ms, so that a repeated release, whose first reply was lost, finds the caller's own
-- tombstone and succeeds. Replies {'ok'} or {'lost', status, fence}.
local key = KEYS[1]
local h = redis.call('HMGET', key, 'st', 'fe')
if h[1] == 'released' and h[2] == ARGV[1] then
  return {'ok'}
end
if h[1] ~= 'in_progress' or h[2] ~= ARGV[1] then
  return {'lost', h[1] or '', h[2] or ''}
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', key, 'st', 'released', 'ea', string.format('%.0f', now_ms))
redis.call('HDEL', key, 'lu', 'rs', 'cd')
redis.call('PEXPIRE', key, ARGV[3])
redis.call('PUBLISH', ARGV[2], 'released')
return {'ok'}

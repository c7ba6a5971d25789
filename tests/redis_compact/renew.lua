-- renew.lua: extend the caller's lease.
--
-- KEYS[1]  the record hash
-- ARGV[1]  fence      ARGV[2] lease (ms)
--
-- Only an in_progress record under this very fence may be renewed (even after its lease ran
-- out, as long as nobody re-claimed it). lease_until = now + lease; expires_at (and the key's
-- PEXPIREAT) is raised to at least lease_until.
-- Replies {'ok', lease_until_ms} or {'lost', status, fence}.
local key = KEYS[1]
local h = redis.call('HMGET', key, 'st', 'fe', 'ea')
if h[1] ~= 'in_progress' or h[2] ~= ARGV[1] then
  return {'lost', h[1] or '', h[2] or ''}
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease_until = now_ms + tonumber(ARGV[2])
local lu = string.format('%.0f', lease_until)
if tonumber(h[3] or 0) < lease_until then
  redis.call('HSET', key, 'lu', lu, 'ea', lu)
  redis.call('PEXPIREAT', key, lu)
else
  redis.call('HSET', key, 'lu', lu)
end
return {'ok', lu}

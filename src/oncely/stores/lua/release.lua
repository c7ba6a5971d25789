-- release.lua: give the caller's claim up (delete the record) and wake waiters.
--
-- KEYS[1]  the record hash
-- ARGV[1]  fence      ARGV[2] the done channel "<prefix>:done:<scope>:<digest>"
--
-- Only an in_progress record under this very fence may be released.
-- Replies {'ok'} or {'lost', status, fence}.
local key = KEYS[1]
local h = redis.call('HMGET', key, 'st', 'fe')
if h[1] ~= 'in_progress' or h[2] ~= ARGV[1] then
  return {'lost', h[1] or '', h[2] or ''}
end
redis.call('DEL', key)
redis.call('PUBLISH', ARGV[2], 'released')
return {'ok'}

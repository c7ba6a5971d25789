-- delete.lua: remove a record whatever its state, and wake waiters if there was one.
--
-- KEYS[1]  the record hash
-- ARGV[1]  the done channel "<prefix>:done:<scope>:<digest>"
-- ARGV[2]  '1': delete a running record too; '0': leave a running record (in_progress, lease
--          not run out by the server's TIME) alone and reply 0 (forget() of a running call)
--
-- Replies 1 if a live record was deleted, else 0 (a release tombstone goes too, unreported).
local h = redis.call('HMGET', KEYS[1], 'st', 'lu', 'ea')
local st = h[1]
local compact = st and string.match(st, '^c%d*$')
if ARGV[2] == '0' and st == 'in_progress' then
  local t = redis.call('TIME')
  local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if tonumber(h[2] or 0) > now_ms and tonumber(h[3] or 0) > now_ms then
    return 0
  end
end
if redis.call('DEL', KEYS[1]) == 0 then
  return 0
end
redis.call('PUBLISH', ARGV[1], 'deleted')
if st == 'in_progress' or st == 'completed' or compact then
  return 1
end
return 0

-- delete.lua: remove a record whatever its state, and wake waiters if there was one.
--
-- KEYS[1]  the record hash
-- ARGV[1]  the done channel "<prefix>:done:<scope>:<digest>"
--
-- Replies 1 if a live record was deleted, else 0 (a release tombstone goes too, unreported).
local st = redis.call('HGET', KEYS[1], 'st')
if redis.call('DEL', KEYS[1]) == 0 then
  return 0
end
redis.call('PUBLISH', ARGV[1], 'deleted')
if st == 'in_progress' or st == 'completed' then
  return 1
end
return 0

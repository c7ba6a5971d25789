-- delete.lua: remove a record whatever its state, and wake waiters if there was one.
--
-- KEYS[1]  the record hash
-- ARGV[1]  the done channel "<prefix>:done:<scope>:<digest>"
--
-- Replies 1 if a record was deleted, else 0.
local n = redis.call('DEL', KEYS[1])
if n > 0 then
  redis.call('PUBLISH', ARGV[1], 'deleted')
end
return n

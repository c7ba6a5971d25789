-- extend.lua: reset the lock's ttl only if the caller still owns it.
--
-- KEYS[1]  the lock        ARGV[1] owner token       ARGV[2] ttl (ms)
--
-- Replies 1 (extended) or 0 (the lock is gone or another owner's).
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1

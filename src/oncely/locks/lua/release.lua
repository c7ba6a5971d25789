-- release.lua: delete the lock only if the caller still owns it, and wake one waiter.
--
-- KEYS[1]  the lock        KEYS[2] the wake-up list "<prefix>:{<name>}:signal"
-- ARGV[1]  owner token     ARGV[2] how long an unclaimed wake-up stays (ms)
--
-- Replies 1 (released) or 0 (the lock is gone or another owner's: nothing was touched).
-- Waiters BLPOP the wake-up list; it holds at most one element, so a release wakes one waiter
-- (the one that has waited longest, as Redis serves blocked clients in order).
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('RPUSH', KEYS[2], '1')
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1

-- inspect.lua: who holds the lock, read atomically with its remaining ttl.
--
-- KEYS[1]  the lock        ARGV[1] owner token ('' to ask only whether anyone holds it)
--
-- Replies {owned (1/0), pttl_ms}; pttl -2 means nobody holds the lock.
local cur = redis.call('GET', KEYS[1])
if not cur then
  return {0, -2}
end
local owned = 0
if cur == ARGV[1] then
  owned = 1
end
return {owned, redis.call('PTTL', KEYS[1])}

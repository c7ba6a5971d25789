-- acquire.lua: take the lock for an owner and hand out a fencing token, in one step.
--
-- KEYS[1]  the lock          "<prefix>:{<name>}"          (a string: the owner token)
-- KEYS[2]  the fence counter "<prefix>:{<name>}:fence"
-- ARGV[1]  owner token       ARGV[2] ttl (ms)       ARGV[3] how long to keep the counter (ms)
--
-- Replies {1, fence, ttl_ms} when the caller holds the lock now, {0, pttl_ms} when another
-- owner holds it (pttl -1: that key has no expiry). Numbers travel as strings where they may
-- exceed 2^31.
--
-- The fence is INCR of the counter, raised to the server's TIME in microseconds if that is
-- larger: it grows with every acquisition, and still grows after the counter is lost (a restart
-- without persistence, or the counter's own expiry), as long as the server clock does not step
-- back. A repeated request of the same owner (a client retry) gets its own fence back.
local cur = redis.call('GET', KEYS[1])
if cur then
  if cur ~= ARGV[1] then
    return {0, redis.call('PTTL', KEYS[1])}
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, redis.call('GET', KEYS[2]) or '0', ARGV[2]}
end
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
-- The rule of every oncely script that counts (claim.lua, cas.lua): a number it computes stays
-- below 2^53, where Lua's doubles are exact; checked on the stored text before anything is
-- written (INCR would have raised the counter first, and fails with its own error on a counter
-- at 2^63 - 1 or one that is not a number).
local counter = redis.call('GET', KEYS[2]) or '0'
if not string.match(counter, '^%d+$') or #counter > 16
    or (#counter == 16 and counter >= '9007199254740991') then
  return redis.error_reply('oncely: the fence counter ' .. KEYS[2] .. ' is at 2^53 or more ' ..
    '(or not a count): fences there would repeat, so the lock is not taken; a counter only ' ..
    'gets there when set by hand')
end
local fence = tonumber(counter) + 1
if fence < now_us then
  fence = now_us
end
redis.call('SET', KEYS[2], string.format('%.0f', fence))
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {1, string.format('%.0f', fence), ARGV[2]}

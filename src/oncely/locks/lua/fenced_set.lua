-- fenced_set.lua: write a value only if the writer's fencing token is not older than the last.
--
-- KEYS[1]  the protected value, a hash {fence, value}
-- ARGV[1]  fencing token   ARGV[2] value   ARGV[3] expiry (ms, 0: none)
--
-- Replies {1, token} when written, {0, stored_fence} when the token is older than the stored
-- one (a holder that lost its lock: its write is refused). The same token may write again.
-- fences compared as decimal text (length, then digits): exact at any size, where tonumber()
-- would round fences past 2^53 and let an older one pass as equal
local function above(a, b)
  if #a ~= #b then
    return #a > #b
  end
  return a > b
end
local stored = redis.call('HGET', KEYS[1], 'fence')
if stored and above(stored, ARGV[1]) then
  return {0, stored}
end
redis.call('HSET', KEYS[1], 'fence', ARGV[1], 'value', ARGV[2])
if tonumber(ARGV[3]) > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return {1, ARGV[1]}

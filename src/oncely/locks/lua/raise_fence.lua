-- raise_fence.lua (Redlock): lift this node's fence counter to the token the quorum agreed on.
--
-- KEYS[1]  the lock        KEYS[2] the fence counter
-- ARGV[1]  owner token     ARGV[2] token            ARGV[3] how long to keep the counter (ms)
--
-- Only while the caller still owns the lock on this node. A later holder can only take this
-- node after that, so its token here (and so its Redlock token, the maximum over its quorum,
-- which shares a node with ours) is larger. Replies 1 (raised or already higher) or 0 (not
-- the owner here any more).
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
-- fences compared as decimal text (length, then digits): exact at any size
local cur = redis.call('GET', KEYS[2]) or '0'
if #cur < #ARGV[2] or (#cur == #ARGV[2] and cur < ARGV[2]) then
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
end
return 1

-- complete.lua: store the result of the caller's claim and wake waiters.
--
-- KEYS[1]  the record hash
-- ARGV[1]  fence      ARGV[2] result (bytes)      ARGV[3] codec      ARGV[4] ttl (ms)
-- ARGV[5]  the done channel "<prefix>:done:<scope>:<digest>"
--
-- Only an in_progress record under this very fence may be completed (even after its lease ran
-- out, as long as nobody re-claimed it). A record already completed under this fence with this
-- very result is the caller's own earlier completion whose reply was lost: success, and nothing
-- changes, but for its expiry set again: a write, so that a WAIT after this repeat (oncely's
-- wait_replicas) waits for a replication offset past the earlier completion instead of finding
-- a connection that wrote nothing. Replies {'ok'} or {'lost', status, fence}.
--
-- The result is kept in pieces of at most 64 bytes (rs, then r1 .. rN, with N in rn) when it is
-- longer than that and at most 1,024 bytes: one value over hash-max-listpack-value (64 by
-- default) turns the whole hash from a listpack into a hashtable, about 600 bytes more per key.
-- A longer result is kept whole in rs (its own size dominates then); so are records written
-- before the pieces (no rn), and every reader accepts both.
local PIECE, MOST = 64, 16
local key = KEYS[1]
local h = redis.call('HMGET', key, 'st', 'fe')
if h[1] == 'completed' and h[2] == ARGV[1] then
  local done = redis.call('HMGET', key, 'rs', 'cd', 'rn')
  local rs = done[1]
  if done[3] then
    local names = {}
    for i = 1, tonumber(done[3]) do
      names[i] = 'r' .. i
    end
    rs = (rs or '') .. table.concat(redis.call('HMGET', key, unpack(names)))
  end
  if rs == ARGV[2] and done[2] == ARGV[3] then
    redis.call('PEXPIREAT', key, redis.call('HGET', key, 'ea'))
    return {'ok'}
  end
end
if h[1] ~= 'in_progress' or h[2] ~= ARGV[1] then
  return {'lost', h[1] or '', h[2] or ''}
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ea = string.format('%.0f', now_ms + tonumber(ARGV[4]))
local rs = ARGV[2]
local fields = {'st', 'completed', 'cd', ARGV[3], 'ea', ea, 'rs', rs}
if #rs > PIECE and #rs <= PIECE * MOST then
  fields[8] = string.sub(rs, 1, PIECE)
  local pieces = math.ceil(#rs / PIECE) - 1
  for i = 1, pieces do
    fields[#fields + 1] = 'r' .. i
    fields[#fields + 1] = string.sub(rs, i * PIECE + 1, (i + 1) * PIECE)
  end
  fields[#fields + 1] = 'rn'
  fields[#fields + 1] = tostring(pieces)
end
redis.call('HSET', key, unpack(fields))
redis.call('HDEL', key, 'lu')
redis.call('PEXPIREAT', key, ea)
redis.call('PUBLISH', ARGV[5], 'completed')
return {'ok'}

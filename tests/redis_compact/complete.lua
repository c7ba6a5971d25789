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
-- Layouts. A claim writes st 'in_progress', fe fence, fp fingerprint, lu lease_until (ms), ea
-- expires_at (ms), ca created_at (ms) (claim.lua). A completion turns that into the compact
-- completed record, which keeps only what a replay needs (issue 13: memory per completed key):
--   st  'c' (completed, compact), or 'cN' when the result is kept in N + 1 pieces (below)
--   fe  fence      ea  expires_at (ms; also the key's PEXPIREAT)
--   fx  the fingerprint's longest even-length lowercase-hex tail as raw bytes (half the size)
--   ft  the rest of the fingerprint, before that tail (absent if empty)
--   ca  created_at, only when it is not the fence's millisecond (the fence is the claim's TIME
--       in microseconds unless the counter ran ahead of the clock)
--   rs  result, cd codec; a result of 65 to 1,024 bytes is kept in pieces of 64 bytes (rs, then
--       r1 .. rN): one value over hash-max-listpack-value (64 by default) turns the whole hash
--       from a listpack into a hashtable, about 600 bytes more per key. A longer result is kept
--       whole in rs (its own size dominates then).
-- A build of an earlier layout finds no fp in a compact record and answers Mismatch (it never
-- runs the call again); st and ea stay so that it sees a live record at all.
-- Records completed by earlier versions (st 'completed', fp, ca, and rn = N when the result is
-- in pieces; or the whole result in rs and sc scope, dg digest fields) are read as they are.
--
--#include record.lua
local key = KEYS[1]
local h = redis.call('HMGET', key, 'st', 'fe', 'fp', 'lu', 'ea', 'ca', 'rs', 'cd', 'rn', 'ft', 'fx')
if (h[1] == 'completed' or compact(h[1])) and h[2] == ARGV[1] then
  h = record(key, h)
  if h[7] == ARGV[2] and h[8] == ARGV[3] then
    redis.call('PEXPIREAT', key, h[5])
    return {'ok'}
  end
  h[1] = 'completed'
end
if h[1] ~= 'in_progress' or h[2] ~= ARGV[1] then
  return {'lost', h[1] or '', h[2] or ''}
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ea = string.format('%.0f', now_ms + tonumber(ARGV[4]))
local rs = ARGV[2]
local PIECE, MOST = 64, 16
local fields = {'st', 'c', 'cd', ARGV[3], 'ea', ea, 'rs', rs}
local gone = {'lu', 'fp', 'sc', 'dg', 'rn'}
-- the fingerprint's longest even-length lowercase-hex tail: fp[cut + 1 ..] (a scan from the end,
-- linear whatever the fingerprint; claim gets the same split from the client)
local fp = h[3] or ''
local cut = #fp
while cut > 0 do
  local b = string.byte(fp, cut)
  if not ((b >= 48 and b <= 57) or (b >= 97 and b <= 102)) then
    break
  end
  cut = cut - 1
end
if (#fp - cut) % 2 == 1 then
  cut = cut + 1
end
local head, tail = string.sub(fp, 1, cut), string.sub(fp, cut + 1)
if #tail > 0 then
  fields[#fields + 1] = 'fx'
  fields[#fields + 1] = string.gsub(tail, '..', function(x)
    return string.char(tonumber(x, 16))
  end)
end
if #head > 0 then
  fields[#fields + 1] = 'ft'
  fields[#fields + 1] = head
end
if h[6] and tonumber(h[6]) == math.floor(tonumber(h[2]) / 1000) then
  gone[#gone + 1] = 'ca'
end
if #rs > PIECE and #rs <= PIECE * MOST then
  local pieces = math.ceil(#rs / PIECE) - 1
  fields[2] = 'c' .. pieces
  fields[8] = string.sub(rs, 1, PIECE)
  for i = 1, pieces do
    fields[#fields + 1] = 'r' .. i
    fields[#fields + 1] = string.sub(rs, i * PIECE + 1, (i + 1) * PIECE)
  end
end
-- HSET first: on a full Redis (maxmemory, noeviction) it is refused before anything changed
redis.call('HSET', key, unpack(fields))
redis.call('HDEL', key, unpack(gone))
redis.call('PEXPIREAT', key, ea)
redis.call('PUBLISH', ARGV[5], 'completed')
return {'ok'}

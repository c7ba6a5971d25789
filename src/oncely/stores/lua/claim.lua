-- claim.lua: take an idempotency key over, or report who holds it (see oncely.stores.base).
--
-- KEYS[1]  the record hash  "<prefix>:<scope>:<digest>"
-- KEYS[2]  the fence counter "<prefix>:fence" (the last fence handed out, for every key)
-- ARGV[1]  fingerprint      ARGV[2] lease (ms)      ARGV[3] ttl (ms)
-- ARGV[4], ARGV[5]  the fingerprint as a compact completed record keeps it (ft, fx: see
--          complete.lua), so that a replay compares it without turning fx into hex
-- ARGV[6]  not after (ms, the store's clock; optional, '' for none): the caller stops waiting
--          for this reply then (its budget ends, oncely.core.storeclock). A claim the server
--          runs later (it was queued in a paused server's socket) decides nothing, writes
--          nothing, and answers {'L', now_ms}: else it would take the key over for a caller
--          that is gone, and the real holder's completion would be refused.
--
-- Replies (every number as a decimal string, so nothing is rounded on the way; now_ms is the
-- time every decision and stored time of this call is based on):
--   {'N', now_ms, fence, lease_until_ms}            the caller owns the key now
--   {'R', now_ms, {st, fe, fp, lu, ea, ca, rs, cd}} a live completed record (replay)
--   {'I', now_ms, fence, lease_until_ms}            a live in-progress record of another caller
--   {'M', now_ms}                                   a live record with another fingerprint
--   {'L', now_ms}                                   too late (ARGV[6]): nothing decided
--
-- Fences: max(counter + 1, TIME in microseconds, old fence + 1), and the counter keeps it. The
-- counter never expires, so a key's fences grow whatever happened between two claims (release,
-- delete, expiry) and whatever the clock does; the clock only seeds it (and covers a lost
-- counter). Scripts run one at a time, so no two claims ever draw the same number.
--
-- Hash fields: see complete.lua. A claim writes st 'in_progress', fe fence, fp fingerprint, lu
-- lease_until (ms), ea expires_at (ms), ca created_at (ms): the layout every earlier version
-- wrote and reads, so builds of both kinds see each other's claims in flight.
--
--#include record.lua
local key = KEYS[1]
local lease_ms = duration_ms(ARGV[2], 'lease')
local ttl_ms = duration_ms(ARGV[3], 'ttl')
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now = string.format('%.0f', now_ms)
local not_after = tonumber(ARGV[6] or '')
if not_after and now_ms > not_after then
  return {'L', now}
end

local h = unpacked(key, redis.call('HMGET', key, 'st', 'fe', 'fp', 'lu', 'ea', 'ca', 'rs', 'cd',
  'rn', 'ft', 'fx'), now_ms)
local fence = now_us
if h[1] then
  local live = h[1] ~= 'released' and tonumber(h[5] or 0) > now_ms
  if live and h[1] == 'in_progress' and tonumber(h[4] or 0) <= now_ms then
    live = false -- abandoned: the holder's lease ran out, whatever its fingerprint
  end
  if live then
    if compact(h[1]) then
      if (h[10] or '') ~= ARGV[4] or (h[11] or '') ~= ARGV[5] then
        return {'M', now}
      end
      h[3] = ARGV[1] -- the very same fingerprint
      return {'R', now, record(key, h)}
    end
    if h[3] ~= ARGV[1] then
      return {'M', now}
    end
    if h[1] == 'completed' then
      return {'R', now, record(key, h)}
    end
    return {'I', now, h[2], h[4]}
  end
  -- released, expired or abandoned: re-claim with a fence above the old one
  local next_fence = (tonumber(h[2] or 0) or math.huge) + 1
  if next_fence > fence then
    fence = next_fence
  end
end
-- The rule of every oncely script that counts (acquire.lua, cas.lua): a number it computes
-- stays below 2^53, where Lua's doubles are exact (past it "+ 1" is lost and fences repeat);
-- checked before anything is written. A counter that is not a number counts as past it.
local counted = (tonumber(redis.call('GET', KEYS[2]) or 0) or math.huge) + 1
if counted > fence then
  fence = counted
end
if fence >= 9007199254740992 then -- 2^53
  return redis.error_reply('oncely: the fence counter ' .. KEYS[2] .. ' is at 2^53 or more (' ..
    string.format('%.0f', fence) .. '): fences there would repeat, so no claim is made; a ' ..
    'counter only gets there when set by hand')
end
if h[1] then
  redis.call('DEL', key)
end

if ttl_ms < lease_ms then
  ttl_ms = lease_ms
end
local fe = string.format('%.0f', fence)
local lu = string.format('%.0f', now_ms + lease_ms)
local ea = string.format('%.0f', now_ms + ttl_ms)
redis.call('HSET', key, 'st', 'in_progress', 'fe', fe, 'fp', ARGV[1], 'lu', lu, 'ea', ea,
  'ca', now)
redis.call('PEXPIREAT', key, ea)
redis.call('SET', KEYS[2], fe)
return {'N', now, fe, lu}

-- list.lua: read the live records among a batch of keys found by SCAN.
--
-- KEYS     candidate keys (hashes under the prefix; some may not be records)
--
-- Replies a list of {st, fe, fp, lu, ea, ca, rs, cd, sc, dg, key}, one per live record; keys
-- that are not oncely records (no status, fence, fingerprint, expiry or creation time) are
-- skipped. sc and dg are nil for records written since they left the hash (the key's name holds
-- both).
--
--#include record.lua
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i = 1, #KEYS do
  local h = redis.call('HMGET', KEYS[i], 'st', 'fe', 'fp', 'lu', 'ea', 'ca', 'rs', 'cd', 'rn', 'ft',
    'fx', 'sc', 'dg')
  if (h[1] == 'in_progress' or h[1] == 'completed' or (compact(h[1]) and tonumber(h[2])))
      and h[2] and h[5] and tonumber(h[5]) and tonumber(h[5]) > now_ms then
    local sc, dg = h[12], h[13]
    h = record(KEYS[i], h)
    if h[3] and h[6] then
      out[#out + 1] = {h[1], h[2], h[3], h[4], h[5], h[6], h[7], h[8], sc, dg, KEYS[i]}
    end
  end
end
return out

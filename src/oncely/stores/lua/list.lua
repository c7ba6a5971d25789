-- list.lua: read the live records among a batch of keys found by SCAN.
--
-- KEYS     candidate keys (hashes under the prefix; some may not be records)
--
-- Replies a list of {st, fe, fp, lu, ea, ca, rs, cd, sc, dg}, one per live record; keys that
-- are not oncely records (no status, fence, expiry, scope or digest) are skipped.
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i = 1, #KEYS do
  local h = redis.call('HMGET', KEYS[i], 'st', 'fe', 'fp', 'lu', 'ea', 'ca', 'rs', 'cd', 'sc', 'dg')
  if (h[1] == 'in_progress' or h[1] == 'completed') and h[2] and h[3] and h[5] and h[6]
      and h[9] and h[10] and tonumber(h[5]) and tonumber(h[5]) > now_ms then
    out[#out + 1] = h
  end
end
return out

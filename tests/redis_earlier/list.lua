-- list.lua: read the live records among a batch of keys found by SCAN.
--
-- KEYS     candidate keys (hashes under the prefix; some may not be records)
--
-- Replies a list of {st, fe, fp, lu, ea, ca, rs, cd, sc, dg, key}, one per live record; keys
-- that are not oncely records (no status, fence, fingerprint, expiry or creation time) are
-- skipped. sc and dg are nil for records written since they left the hash (the key's name holds
-- both); a result kept in pieces (see complete.lua) is joined again.
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i = 1, #KEYS do
  local h = redis.call('HMGET', KEYS[i], 'st', 'fe', 'fp', 'lu', 'ea', 'ca', 'rs', 'cd', 'rn',
    'sc', 'dg')
  if (h[1] == 'in_progress' or h[1] == 'completed') and h[2] and h[3] and h[5] and h[6]
      and tonumber(h[5]) and tonumber(h[5]) > now_ms then
    local rs = h[7]
    if h[9] then
      local names = {}
      for j = 1, tonumber(h[9]) do
        names[j] = 'r' .. j
      end
      rs = (rs or '') .. table.concat(redis.call('HMGET', KEYS[i], unpack(names)))
    end
    out[#out + 1] = {h[1], h[2], h[3], h[4], h[5], h[6], rs, h[8], h[10], h[11], KEYS[i]}
  end
end
return out

-- get.lua: read one live record.
--
-- KEYS[1]  the record hash
--
-- Replies {st, fe, fp, lu, ea, ca, rs, cd}, or nil when there is no live record (a record whose
-- expires_at passed is gone for every reader, even in the millisecond before Redis drops it).
-- A result kept in pieces (see complete.lua) is joined again: rs .. r1 .. rN, N in rn.
local function whole(key, h)
  if h[9] then
    local names = {}
    for i = 1, tonumber(h[9]) do
      names[i] = 'r' .. i
    end
    h[7] = (h[7] or '') .. table.concat(redis.call('HMGET', key, unpack(names)))
  end
  h[9] = nil
  return h
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local h = redis.call('HMGET', KEYS[1], 'st', 'fe', 'fp', 'lu', 'ea', 'ca', 'rs', 'cd', 'rn')
if (h[1] ~= 'in_progress' and h[1] ~= 'completed') or not h[2] or not h[3]
    or (tonumber(h[5]) or 0) <= now_ms then
  return false
end
return whole(KEYS[1], h)

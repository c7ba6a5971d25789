-- get.lua: read one live record.
--
-- KEYS[1]  the record hash
--
-- Replies {st, fe, fp, lu, ea, ca, rs, cd}, or nil when there is no live record (a record whose
-- expires_at passed is gone for every reader, even in the millisecond before Redis drops it).
-- A record as the fields {st, fe, fp, lu, ea, ca, rs, cd}, from
-- HMGET st fe fp lu ea ca rs cd rn ft fx (the layouts are in complete.lua): a compact completed
-- record (st 'c') gets its status 'completed', its fingerprint (ft .. the hex of fx) and its
-- created_at (the fence's millisecond unless ca is there) back; a result kept in pieces is joined
-- again: rs .. r1 .. rN, N in rn, or in a compact record as long as the pieces before are full.
local PIECE, MOST = 64, 16
local function fingerprint(h)
  if h[1] ~= 'c' then
    return h[3]
  end
  return (h[10] or '') .. (string.gsub(h[11] or '', '.', function(c)
    return string.format('%02x', string.byte(c))
  end))
end
local function record(key, h)
  if h[1] == 'c' then
    h[3] = fingerprint(h)
    h[1] = 'completed'
    if not h[6] then
      h[6] = string.format('%.0f', math.floor(tonumber(h[2]) / 1000))
    end
    if h[7] and #h[7] == PIECE then
      local names = {}
      for i = 1, MOST - 1 do
        names[i] = 'r' .. i
      end
      local parts = {h[7]}
      for _, part in ipairs(redis.call('HMGET', key, unpack(names))) do
        if not part then
          break
        end
        parts[#parts + 1] = part
      end
      h[7] = table.concat(parts)
    end
  elseif h[9] then
    local names = {}
    for i = 1, tonumber(h[9]) do
      names[i] = 'r' .. i
    end
    h[7] = (h[7] or '') .. table.concat(redis.call('HMGET', key, unpack(names)))
  end
  h[11], h[10], h[9] = nil, nil, nil
  return h
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local h = redis.call('HMGET', KEYS[1], 'st', 'fe', 'fp', 'lu', 'ea', 'ca', 'rs', 'cd', 'rn', 'ft',
  'fx')
if (h[1] ~= 'in_progress' and h[1] ~= 'completed' and h[1] ~= 'c') or not h[2]
    or (tonumber(h[5]) or 0) <= now_ms then
  return false
end
h = record(KEYS[1], h)
if not h[3] then
  return false
end
return h

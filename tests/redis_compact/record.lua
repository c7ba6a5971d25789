-- record.lua: decoding a record hash, included by the scripts that read records
-- (claim, complete, get, list) with a "--#include record.lua" line (oncely.backends.lua
-- puts this text in its place before the script is hashed and sent).
--
-- A record as the fields {st, fe, fp, lu, ea, ca, rs, cd}, from
-- HMGET st fe fp lu ea ca rs cd rn ft fx (the layouts are in complete.lua). A compact completed
-- record (st 'c', or 'cN' with its result in N + 1 pieces) gets its status 'completed', its
-- fingerprint (ft .. the hex of fx) and its created_at (the fence's millisecond unless ca is
-- there) back; a result kept in pieces is joined again: rs .. r1 .. rN (N in st, or in rn).
local function compact(st)
  if st == 'c' then
    return 0
  end
  return st and tonumber(string.match(st, '^c(%d%d?)$'))
end
local function fingerprint(h)
  if not compact(h[1]) then
    return h[3]
  end
  local fx, hex = h[11] or '', {}
  for i = 1, #fx, 64 do -- string.byte of a whole long fx would overflow Lua's stack
    local part = string.sub(fx, i, i + 63)
    hex[#hex + 1] = string.format(string.rep('%02x', #part), string.byte(part, 1, -1))
  end
  return (h[10] or '') .. table.concat(hex)
end
local function record(key, h)
  local pieces = compact(h[1])
  if pieces then
    h[3] = h[3] or fingerprint(h)
    h[1] = 'completed'
    if not h[6] then
      h[6] = string.format('%.0f', math.floor(tonumber(h[2]) / 1000))
    end
  else
    pieces = tonumber(h[9] or 0)
  end
  if pieces > 0 then
    local names = {}
    for i = 1, pieces do
      names[i] = 'r' .. i
    end
    h[7] = (h[7] or '') .. table.concat(redis.call('HMGET', key, unpack(names)))
  end
  h[11], h[10], h[9] = nil, nil, nil
  return h
end

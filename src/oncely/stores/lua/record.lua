-- record.lua: decoding a record hash, included by the scripts that read records
-- (claim, complete, get, list, renew, release, delete) with a "--#include record.lua" line
-- (oncely.backends.lua puts this text in its place before the script is hashed and sent).
--
-- A record as the fields {st, fe, fp, lu, ea, ca, rs, cd}, from
-- HMGET st fe fp lu ea ca rs cd rn ft fx (the layouts are in complete.lua). A packed completed
-- record (st 'C' .. fence .. N) first gets the compact layout's fields (unpacked); a compact
-- completed record (st 'c', or 'cN' with its result in N + 1 pieces) gets its status
-- 'completed', its fingerprint (ft .. the hex of fx) and its created_at (the fence's
-- millisecond unless ca is there) back; a result kept in pieces is joined again: rs .. r1 ..
-- rN (N in st, or in rn).
--
-- The packed status: 'C', the fence in 8 base-94 digits ('!' .. '~', most significant first;
-- printable, so every status a script reports is text), and N when the result is in N + 1
-- pieces. 94^8 microseconds reach the year 2163; a fence past that is kept in a compact record.
local PACKED_MOST = 94 ^ 8
-- A duration argument (ms): a whole number from 0 to 1e12 (1e9 s, oncely.settings.MAX_SECONDS,
-- which every option is checked against when built). Each script checks its durations before
-- it writes anything, so a bad one is an error reply and never a key left without its expiry
-- (an expiry past 64-bit milliseconds made PEXPIREAT fail after the HSET had written).
local MOST_MS = 1e12
local function duration_ms(value, name)
  local n = tonumber(value)
  if not n or n ~= n or n < 0 or n > MOST_MS or n ~= math.floor(n) then
    error({err = 'ERR oncely: ' .. name .. ' must be whole milliseconds from 0 to 1e12, got '
      .. tostring(value)})
  end
  return n
end
local function packed(st)
  return st and #st > 8 and string.byte(st, 1) == 67 -- 'C'
end
local function pack_fence(fence)
  local d = {}
  for i = 8, 1, -1 do
    d[i] = 33 + fence % 94
    fence = math.floor(fence / 94)
  end
  return 'C' .. string.char(d[1], d[2], d[3], d[4], d[5], d[6], d[7], d[8])
end
local function packed_fence(st)
  local a, b, c, d, e, f, g, h = string.byte(st, 2, 9)
  local fence = ((((((a * 94 + b) * 94 + c) * 94 + d) * 94 + e) * 94 + f) * 94 + g) * 94 + h
  -- each digit is 33 more than its value: take 33 * (94^7 + ... + 1) off once
  return string.format('%.0f', fence - 33 * (94 ^ 8 - 1) / 93)
end
-- a record's status and fence as a reply reports them ('completed' for any completed layout)
local function fenced(st, fe)
  if packed(st) then
    return 'completed', packed_fence(st)
  end
  return st, fe
end
-- a packed record's fields as the compact layout has them (st 'c' or 'cN', fe, ea, cd), now_ms
-- being the script's TIME (ms). A packed record keeps its expiry only as the key's PEXPIREAT (its
-- ea field holds '9e99', so that a build of an earlier layout sees it live while the key lives):
-- PEXPIRETIME reads it back (Redis 7.0 and later); before 7.0, now_ms + PTTL, to the
-- millisecond (+-1: PTTL counts from the server's own reading of the clock).
local function unpacked(key, h, now_ms)
  local st = h[1]
  if packed(st) then
    h[1] = 'c' .. string.sub(st, 10)
    h[2] = packed_fence(st)
    local at = redis.pcall('PEXPIRETIME', key)
    if type(at) ~= 'number' then
      at = redis.call('PTTL', key)
      at = at < 0 and at or now_ms + at
    end
    h[5] = at < 0 and '253402300799000' or string.format('%.0f', at) -- < 0: PERSISTed
    h[8] = h[8] or 'json'
  end
  return h
end
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

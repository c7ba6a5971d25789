-- cas.lua: compare-and-set on a versioned hash, decided on the server in one script.
--
-- KEYS[1]  the hash: the caller's fields plus a version field (a positive decimal integer,
--          below 2^53)
-- ARGV[1]  the version field's name     ARGV[2] expected version (decimal; 0: "must not exist")
-- ARGV[3]  'set' (replace every field), 'merge' (set these fields, keep the others), 'delete'
-- ARGV[4..] field, value, field, value, ...
--
-- Replies {1, new_version} when written (0 after a delete); {0, current} when the hash is not
-- at the expected version (current 0: the key does not exist); {-1, raw} when the key holds a
-- hash without a usable version (missing, not a canonical positive integer); {-2, type} when
-- the key holds another type; {-3, current} when the stored version is 2^53 - 1 or more
-- (whatever the expected version, except a matching delete: see below).
-- Nothing is written unless the reply is {1, ...}.
--
-- The rule of every oncely script that counts (this one, the fence counters of claim.lua and
-- acquire.lua): a number it computes must stay below 2^53, where Lua's doubles are exact;
-- past it "+ 1" is lost, versions stop growing and a stale writer matches. A stored version of
-- 2^53 - 1 or more cannot be raised, so nothing is written ({-3}: VersionExhausted); only a
-- delete at exactly 2^53 - 1 passes.
--
-- Versions: max(current + 1, TIME in microseconds), a decimal string. They grow by at least one
-- per write and follow the server's clock, so a hash deleted and created again starts above
-- every version the old one had (unless the server's clock stepped back by more than the time
-- since): a writer holding a version of the old hash can never match the new one (no ABA).
local key, vfield, expected, op = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
-- One HGET in the common case; pcall turns WRONGTYPE (not a hash) into a reply.
local current = redis.pcall('HGET', key, vfield)
if type(current) == 'table' and current.err then
  return {-2, redis.call('TYPE', key)['ok']}
end
if not current and redis.call('EXISTS', key) == 0 then
  if expected ~= '0' or op == 'delete' then
    return {0, 0}
  end
else
  if not current or not string.match(current, '^[1-9]%d*$') then
    return {-1, current or false}
  end
  -- compared as text (exact at any size): 9007199254740991 is 2^53 - 1. A delete at exactly
  -- the expected version needs no arithmetic (the way out of an exhausted hash)
  local top = #current > 16 or (#current == 16 and current >= '9007199254740991')
  if top and (op ~= 'delete' or current ~= expected) then
    return {-3, current}
  end
  if current ~= expected then
    return {0, current}
  end
  if op == 'delete' then
    redis.call('DEL', key)
    return {1, 0}
  end
  if op == 'set' then
    local keep = {}
    for i = 4, #ARGV, 2 do
      keep[ARGV[i]] = true
    end
    keep[vfield] = true
    local drop = {}
    for _, name in ipairs(redis.call('HKEYS', key)) do
      if not keep[name] then
        drop[#drop + 1] = name
        if #drop == 100 then
          redis.call('HDEL', key, unpack(drop))
          drop = {}
        end
      end
    end
    if #drop > 0 then
      redis.call('HDEL', key, unpack(drop))
    end
  end
end
local pairs_ = {}
for i = 4, #ARGV, 2 do
  pairs_[#pairs_ + 1] = ARGV[i]
  pairs_[#pairs_ + 1] = ARGV[i + 1]
  if #pairs_ == 200 then
    redis.call('HSET', key, unpack(pairs_))
    pairs_ = {}
  end
end
if #pairs_ > 0 then
  redis.call('HSET', key, unpack(pairs_))
end
local t = redis.call('TIME')
local version = tonumber(t[1]) * 1000000 + tonumber(t[2])
if current and tonumber(current) + 1 > version then
  version = tonumber(current) + 1
end
version = string.format('%.0f', version)
redis.call('HSET', key, vfield, version)
return {1, version}

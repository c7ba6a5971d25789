-- One state machine transition (oncely.statemachine.redis), one atomic step.
-- KEYS[1]: the entity hash (field "state"); KEYS[2]: its history list; KEYS[3]: its used
-- idempotency keys (hash key -> "<transition>\n<state>").
-- ARGV: target, transition, key ('' for none), sources...
-- Returns {"applied", previous state} | {"replay", "<transition>\n<state>"} |
--         {"rejected", current state} | {"missing"} | {"nostate"} (the hash exists, with no
--         "state" field) | {"wrongtype", key index (1..3), its type}: a key of another type
--         (a string, a list ...), checked before anything is read or written: a script that
--         fails half-way is not rolled back (the state changed, its history entry missing).
local entity, history, keys = KEYS[1], KEYS[2], KEYS[3]
local target, transition, key = ARGV[1], ARGV[2], ARGV[3]
local wanted = {'hash', 'list', 'hash'}
for i = 1, (key ~= '' and 3 or 2) do
  local found = redis.call('TYPE', KEYS[i])['ok']
  if found ~= 'none' and found ~= wanted[i] then return {'wrongtype', i, found} end
end
if key ~= '' then
  local previous = redis.call('HGET', keys, key)
  if previous then return {'replay', previous} end
end
local current = redis.call('HGET', entity, 'state')
if not current then
  if redis.call('EXISTS', entity) == 1 then return {'nostate'} end
  return {'missing'}
end
for i = 4, #ARGV do
  if ARGV[i] == current then
    redis.call('HSET', entity, 'state', target)
    local t = redis.call('TIME')
    local at = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
    redis.call('RPUSH', history, cjson.encode({transition, target, at, key}))
    if key ~= '' then redis.call('HSET', keys, key, transition .. '\n' .. target) end
    return {'applied', current}
  end
end
return {'rejected', current}

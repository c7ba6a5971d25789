-- The branch barrier (oncely.statemachine.barrier), one atomic step.
-- KEYS[1]: the gid's hash; fields "<op>:<branch>" -> the op that wrote the row.
-- ARGV: branch, op, original op ('' unless op compensates), horizon ms, effects (JSON array of
-- commands run only on EXECUTE).
local gid, branch, op, origin = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local current = op .. ':' .. branch
if redis.call('HSETNX', gid, current, op) == 0 then
  if origin == '' then
    local reason = redis.call('HGET', gid, current)
    if reason ~= op then return 'HANGING' end
  end
  return 'DUPLICATE'
end
-- the horizon counts from the gid's newest row (the store's clock)
redis.call('PEXPIRE', gid, ARGV[4])
if origin ~= '' then
  if redis.call('HSETNX', gid, origin .. ':' .. branch, op) == 1 then
    return 'EMPTY_COMPENSATION'
  end
end
for _, command in ipairs(cjson.decode(ARGV[5])) do
  redis.call(unpack(command))
end
return 'EXECUTE'

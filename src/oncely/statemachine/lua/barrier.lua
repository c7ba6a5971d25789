-- The branch barrier (oncely.statemachine.barrier), one atomic step.
-- KEYS[1]: the gid's hash; fields "<op>:<branch>" -> the op that wrote the row.
-- ARGV: branch, op, original op ('' unless op compensates), horizon ms, effects (JSON array of
-- commands run only on EXECUTE).
local gid, branch, op, origin = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local current = op .. ':' .. branch
local existing = redis.call('HGET', gid, current)
if existing then
  if origin == '' and existing ~= op then return 'HANGING' end
  return 'DUPLICATE'
end
local verdict = 'EXECUTE'
if origin ~= '' and redis.call('HSETNX', gid, origin .. ':' .. branch, op) == 1 then
  verdict = 'EMPTY_COMPENSATION'
else
  -- the effects first: a command that fails stops the script before the row below is written,
  -- so a retry runs the branch again instead of finding it done
  for _, command in ipairs(cjson.decode(ARGV[5])) do
    redis.call(unpack(command))
  end
end
redis.call('HSET', gid, current, op)
-- the horizon counts from the gid's newest row (the store's clock)
redis.call('PEXPIRE', gid, ARGV[4])
return verdict

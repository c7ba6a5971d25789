-- The branch barrier (oncely.statemachine.barrier), one atomic step.
-- KEYS[1]: the gid's hash; fields "<op>:<branch>" -> the op that wrote the row, and
-- "!partial:<branch>" -> JSON of a branch whose effects were applied in part (see below).
-- ARGV: branch, op, original op ('' unless op compensates), horizon ms, effects (JSON array of
-- commands run only on EXECUTE).
local gid, branch, op, origin = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local partial = '!partial:' .. branch
-- a branch whose effects were applied in part is broken: every later call on it (a retry, its
-- compensation, its confirm) answers PARTIAL until an operator repairs it (fails closed)
local broken = redis.call('HGET', gid, partial)
if broken then return {'PARTIAL', broken} end
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
  -- the effects first. Redis does not roll a script back: a command that fails leaves the
  -- ones before it applied. The first one failing applied nothing: the error propagates and no
  -- row is written, so a retry runs the branch again. A later one failing: the branch is marked
  -- broken in this same script (no retry can apply the first commands twice)
  local commands = cjson.decode(ARGV[5])
  for i, command in ipairs(commands) do
    local reply = redis.pcall(unpack(command))
    if type(reply) == 'table' and reply.err then
      if i == 1 then return redis.error_reply(reply.err) end
      local info = cjson.encode({op = op, applied = i - 1, effects = commands, error = reply.err})
      redis.call('HSET', gid, partial, info)
      redis.call('PEXPIRE', gid, ARGV[4])
      return {'PARTIAL', info}
    end
  end
end
redis.call('HSET', gid, current, op)
-- the horizon counts from the gid's newest row (the store's clock)
redis.call('PEXPIRE', gid, ARGV[4])
return verdict

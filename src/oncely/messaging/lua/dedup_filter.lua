-- oncely.messaging.dedup: the exact window, a batch in one script.
-- KEYS: one key per id (prefix .. id); ARGV[1]: the window in milliseconds.
-- Each key is SET NX PX: the first sighting of an id inside the window creates it (Redis's
-- clock decides the expiry). Returns the 1-based positions of the ids that were new.
local window = ARGV[1]
local new = {}
for i = 1, #KEYS do
  if redis.call('SET', KEYS[i], '1', 'NX', 'PX', window) then
    new[#new + 1] = i
  end
end
return new

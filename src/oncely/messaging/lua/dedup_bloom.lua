-- oncely.messaging.dedup: the Bloom-filter window on Redis, a batch in one script.
-- KEYS[1]: the filter's key prefix (hash-tagged, so both generations share its slot).
-- ARGV[1]: window (ms), ARGV[2]: bits per generation (m), ARGV[3]: hashes (k), ARGV[4..]: ids.
-- Two generations of m bits: the one of the current window (numbered by Redis's TIME) and the
-- one before it. An id is new unless all k of its bits are set in either; a new id's bits are
-- set in the current generation. Bits come from double hashing of SHA-1 (Kirsch-Mitzenmacher):
-- bit_j = (h1 + j * h2) mod m. Returns the 1-based positions (in ARGV[4..]) of the new ids.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local m = tonumber(ARGV[2])
local k = tonumber(ARGV[3])
local gen = math.floor(now / window)
local cur = KEYS[1] .. ':' .. gen
local prev = KEYS[1] .. ':' .. (gen - 1)
local new = {}
local bits = {}
local ttl = 2 * window + 1000
local expiring = false
for i = 4, #ARGV do
  local h = redis.sha1hex(ARGV[i])
  local h1 = tonumber(string.sub(h, 1, 8), 16)
  local h2 = tonumber(string.sub(h, 9, 16), 16)
  if h2 % 2 == 0 then h2 = h2 + 1 end
  local in_cur, in_prev = true, true
  for j = 0, k - 1 do
    local b = (h1 + j * h2) % m
    bits[j + 1] = b
    if in_cur and redis.call('GETBIT', cur, b) == 0 then in_cur = false end
    if in_prev and redis.call('GETBIT', prev, b) == 0 then in_prev = false end
    if not in_cur and not in_prev then
      for r = j + 1, k - 1 do bits[r + 1] = (h1 + r * h2) % m end
      break
    end
  end
  if not in_cur and not in_prev then
    for j = 1, k do
      redis.call('SETBIT', cur, bits[j], 1)
      -- expire the generation as soon as it exists: if a later call fails mid-script, no
      -- bitmap is ever left without a TTL
      if not expiring then redis.call('PEXPIRE', cur, ttl); expiring = true end
    end
    new[#new + 1] = i - 3
  end
end
redis.call('PEXPIRE', cur, ttl)
return new

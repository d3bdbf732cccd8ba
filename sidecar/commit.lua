-- One group commit of the ingest sidecar: every event of every request in the batch, atomically.
--
-- Every key is the pipeline's (one hash tag, so one Redis Cluster slot). The pipeline's entry in
-- ap:pipelines (another slot) is written by the committer itself, before its first script.
--
-- KEYS[1]                   dirty ZSET (bucket key -> ms first dirtied)
-- KEYS[2]                   this commit's fence token
-- KEYS[3 .. 2+nd]           fence tokens of earlier commits whose reply was received (deleted here)
-- KEYS[3+nd .. 2+nd+nb]     live bucket hashes touched by this batch
-- KEYS[3+nd+nb ..]          one message-id dedup key per deduplicated event, in order
-- ARGV[1] ttl seconds   ARGV[2] dedup window seconds   ARGV[3] nd   ARGV[4] nb
-- ARGV[5 ..]            per bucket b = 1..nb: its number of summed fields f, then f pairs: field, increment
-- then, per deduplicated event: n, followed by n pairs: bucket number, field (increment 1)
--
-- Returns {1, ordinals of duplicate events...} when applied, {0} when the token already existed
-- (the commit was fenced off, or already applied): in that case nothing was written.
-- The token ends up holding "ok:<ordinals>" so a fence after an ambiguous timeout can tell both
-- that the commit was applied and which of its events were duplicates.

local nd = tonumber(ARGV[3])
local nb = tonumber(ARGV[4])
local boff = 2 + nd
local moff = boff + nb

-- Refuse before writing anything if a key has a foreign type: a script that fails half-way is
-- not rolled back, so every failure must happen here.
local function expect(key, wanted)
  local t = redis.call('TYPE', key)['ok']
  if t ~= 'none' and t ~= wanted then
    return redis.error_reply('WRONGTYPE ' .. key .. ' holds a ' .. t .. ', expected a ' .. wanted)
  end
  return nil
end
local err = expect(KEYS[1], 'zset')
if err then return err end
for b = 1, nb do
  err = expect(KEYS[boff + b], 'hash')
  if err then return err end
end

if not redis.call('SET', KEYS[2], 'run', 'NX', 'PX', 600000) then
  return {0}
end

local touched = {}
local a = 5
for b = 1, nb do
  local f = tonumber(ARGV[a])
  a = a + 1
  if f > 0 then
    local key = KEYS[boff + b]
    for _ = 1, f do
      redis.call('HINCRBY', key, ARGV[a], ARGV[a + 1])
      a = a + 2
    end
    touched[b] = true
  end
end

local result = {1}
local dups = {}
local m = 0
local window = ARGV[2]
local last = #ARGV
while a <= last do
  m = m + 1
  local n = tonumber(ARGV[a])
  a = a + 1
  if redis.call('SET', KEYS[moff + m], '1', 'NX', 'EX', window) then
    for _ = 1, n do
      local b = tonumber(ARGV[a])
      redis.call('HINCRBY', KEYS[boff + b], ARGV[a + 1], 1)
      touched[b] = true
      a = a + 2
    end
  else
    result[#result + 1] = m
    dups[#dups + 1] = m
    a = a + 2 * n
  end
end

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = ARGV[1]
-- One ZADD per (up to) 500 buckets: unpack() has a stack limit, a batch may span many hours.
local dirty = {}
for b = 1, nb do
  if touched[b] then
    local key = KEYS[boff + b]
    redis.call('EXPIRE', key, ttl)
    dirty[#dirty + 1] = now_ms
    dirty[#dirty + 1] = key
    if #dirty == 1000 then
      redis.call('ZADD', KEYS[1], 'NX', unpack(dirty))
      dirty = {}
    end
  end
end
if #dirty > 0 then
  redis.call('ZADD', KEYS[1], 'NX', unpack(dirty))
end
if nd > 0 then
  redis.call('DEL', unpack(KEYS, 3, 2 + nd))
end
redis.call('SET', KEYS[2], 'ok:' .. table.concat(dups, ','), 'PX', 600000)
return result

-- One group commit of the ingest sidecar: every event of every request in the batch, atomically.
--
-- Every key is the pipeline's (one hash tag, so one Redis Cluster slot). The pipeline's entry in
-- ap:pipelines (another slot) is written by the committer itself, before its first script.
--
-- KEYS[1]                   dirty ZSET (bucket key -> ms first dirtied)
-- KEYS[2]                   this commit's fence token
-- KEYS[3 .. 2+nd]           fence tokens of earlier commits whose reply was received (deleted here)
-- KEYS[3+nd .. 2+nd+nb]     live bucket hashes touched by this batch
-- KEYS[3+nd+nb ..]          per deduplicated event, in order: its pre-1.x dedup key ap:{p}:msg:<id>
--                           (read only: a retry first seen by an older sidecar still counts once)
-- ARGV[1] ttl seconds   ARGV[2] dedup window seconds   ARGV[3] nd   ARGV[4] nb
-- ARGV[5]               prefix of the dedup shard keys (ap:{p}:dd:)
-- ARGV[6 ..]            per bucket b = 1..nb: its number of summed fields f, then f pairs: field, increment
-- then, per deduplicated event: its 16-byte message-id digest, n, then n pairs: bucket number, field
--
-- Dedup (docs/http-api.md "Dedup"): time is cut into slices of S = ceil(window / 2) s. A digest is
-- remembered in the current slice's shard hashes: ap:{p}:dd:<S>:<slice>:<h> where h is the first L hex
-- digits of the digest, field = digest bytes 5..16 (96 bits), so every shard stays a small listpack
-- (~16 B per id). L starts at the slice's base level (ap:{p}:dd:<S>:<slice>:L, chosen from the previous
-- slice's count ...:n) and goes one deeper where a shard holds SHARD_CAP fields. Every key of a slice
-- expires at slice end + window (one EXPIREAT, set when the key is created). An id is a duplicate if
-- any slice overlapping the last `window` seconds holds it.
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
local a = 6
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
local last = #ARGV
if a <= last then
  local SHARD_CAP = 128  -- fields per shard: at or below Redis's default hash-max-listpack-entries
  local MAX_LEVEL = 8
  local window = tonumber(ARGV[2])
  local slice_s = math.ceil(window / 2)
  local now_s = tonumber(redis.call('TIME')[1])
  local cur = math.floor(now_s / slice_s)
  local oldest = math.floor((now_s - window) / slice_s)
  local prefix = ARGV[5] .. slice_s .. ':'
  local expire_at = (cur + 1) * slice_s + window
  local cur_slice = prefix .. cur .. ':'
  -- The slices to look in: {key prefix, base level, is current}; a slice without a base holds nothing.
  local slices = {}
  for s = cur, oldest, -1 do
    local base = redis.call('GET', prefix .. s .. ':L')
    if base then slices[#slices + 1] = {prefix .. s .. ':', tonumber(base), s == cur} end
  end
  if not (slices[1] and slices[1][3]) then
    -- The current slice's first id: its shards start at the level where as many ids as the previous
    -- slice got fill them 32..512 on average, so steady traffic needs one level per slice.
    local before = tonumber(redis.call('GET', prefix .. (cur - 1) .. ':n') or '0')
    local base = 0
    while base < MAX_LEVEL and before >= 32 * 16 ^ (base + 1) do base = base + 1 end
    redis.call('SET', cur_slice .. 'L', base)
    redis.call('EXPIREAT', cur_slice .. 'L', expire_at)
    table.insert(slices, 1, {cur_slice, base, true})
  end
  local lens = {}  -- HLEN of the shards this script looked at, kept up to date by its own HSETs
  local added = 0
  -- true (and remembered) if the digest is new within the window, false for a duplicate
  local function first_time(digest)
    local hex = string.format('%02x%02x%02x%02x', string.byte(digest, 1, 4))
    local field = string.sub(digest, 5)
    local target
    for i = 1, #slices do
      local slice = slices[i]
      for level = slice[2], MAX_LEVEL do
        local key = slice[1] .. string.sub(hex, 1, level)
        local n = lens[key]
        if n == nil then
          n = redis.call('HLEN', key)
          lens[key] = n
        end
        if n > 0 and redis.call('HEXISTS', key, field) == 1 then return false end
        -- a deeper level exists only once this one filled up (shards of a slice expire together)
        if n < SHARD_CAP or level == MAX_LEVEL then
          if slice[3] then target = key end
          break
        end
      end
    end
    local n = lens[target]
    redis.call('HSET', target, field, 1)
    if n == 0 then redis.call('EXPIREAT', target, expire_at) end
    lens[target] = n + 1
    added = added + 1
    return true
  end
  while a <= last do
    m = m + 1
    local digest = ARGV[a]
    local n = tonumber(ARGV[a + 1])
    a = a + 2
    if redis.call('EXISTS', KEYS[moff + m]) == 0 and first_time(digest) then
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
  if added > 0 then  -- the next slice's base level is chosen from this count
    redis.call('INCRBY', cur_slice .. 'n', added)
    redis.call('EXPIREAT', cur_slice .. 'n', expire_at)
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

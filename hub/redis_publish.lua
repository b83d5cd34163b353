-- The hub's one write to its Redis stream (hub/redis_broker.py): publish batches, and keep the
-- head, the epoch and the logouts. Everything is read and checked before the first write; each
-- batch is stored whole or not at all, and a batch that cannot be stored stops the ones after
-- it, so an answer never says "stored" for a batch that is not, nor the other way round.
--
-- KEYS[1] the stream; KEYS[2] the head, "<last id> <epoch> <start>"; KEYS[3] the logouts;
-- KEYS[4..] the idempotency keys of the batches that have one, in batch order.
-- ARGV[1] MAXLEN; [2] how long a logout holds (ms); [3] the origin, "<node>:<number of the
-- first batch>"; [4] how long an idempotency key holds (ms); [5] the epoch the caller follows;
-- [6] its witness: the newest entry id it knows was stored in that epoch; [7] a fresh epoch, for
-- Redis to take if it must start one; [8] the most logouts kept; [9] '1' to start a new epoch
-- if the head is still in the caller's epoch (the caller saw Redis go back); then per batch: its
-- event count, its blob, '1' if it has an idempotency key ('0' if not), its body hash, its
-- logout count and that many logouts.
--
-- An epoch names one unbroken history. A new one starts when there is no head (a new prefix,
-- or Redis lost its data), when Redis is behind what the caller saw stored in this epoch (a
-- restart or failover that lost writes), or when the caller asks (it read the order go back).
-- `start` is the last id of the epoch before: the new epoch's entries follow it.
--
-- Returns the head after the call, then one answer per batch: '+<first id> <epoch>' stored,
-- '=<body hash> <first id> <epoch>' stored before under its key (nothing stored now), or
-- '!<why>' not stored.

local function parse_id(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  if not ms then
    return nil, nil
  end
  return tonumber(ms), tonumber(seq)
end

local function key_type(key)
  return redis.call('TYPE', key)['ok']
end

for _, expected in ipairs({{KEYS[1], 'stream'}, {KEYS[2], 'string'}, {KEYS[3], 'zset'}}) do
  local found = key_type(expected[1])
  if found ~= 'none' and found ~= expected[2] then
    return redis.error_reply('hub: ' .. expected[1] .. ' holds a ' .. found .. ', not a ' .. expected[2])
  end
end

local batches = {}
local i = 10
local next_key = 4
while i <= #ARGV do
  local count = tonumber(ARGV[i])
  local logouts = tonumber(ARGV[i + 4])
  if not count or count < 1 or not logouts or logouts < 0 or i + 4 + logouts > #ARGV then
    return redis.error_reply('hub: malformed batch arguments at ' .. i)
  end
  local key = false
  if ARGV[i + 2] == '1' then
    key = KEYS[next_key]
    next_key = next_key + 1
    if not key then
      return redis.error_reply('hub: fewer idempotency keys than batches that name one')
    end
    local found = key_type(key)
    if found ~= 'none' and found ~= 'string' then
      return redis.error_reply('hub: ' .. key .. ' holds a ' .. found .. ', not a string')
    end
  end
  batches[#batches + 1] = {count = count, blob = ARGV[i + 1], key = key, body = ARGV[i + 3],
    logouts = i + 5, logout_count = logouts}
  i = i + 5 + logouts
end
local origin, number = string.match(ARGV[3], '^(.*):(%d+)$')
if not origin or not string.match(ARGV[7], '^[0-9a-z]+$') then
  return redis.error_reply('hub: malformed origin or epoch')
end
number = tonumber(number)

local head = redis.call('GET', KEYS[2])
local last, epoch, start
local changed = false
if head then
  last, epoch, start = string.match(head, '^(%d+-%d+) ([0-9a-z]+) (%d+-%d+)$')
  if not last then
    return redis.error_reply('hub: ' .. KEYS[2] .. ' is not a head')
  end
  local lms, lseq = parse_id(last)
  local wms, wseq = parse_id(ARGV[6])
  if epoch == ARGV[5] and (ARGV[9] == '1' or (wms and (wms > lms or (wms == lms and wseq > lseq)))) then
    epoch = ARGV[7]
    start = last
    changed = true
  end
else
  -- No head: a new history. Ids must still go above whatever the stream already took.
  last = '0-0'
  if key_type(KEYS[1]) == 'stream' then
    local info = redis.call('XINFO', 'STREAM', KEYS[1])
    for j = 1, #info, 2 do
      if info[j] == 'last-generated-id' then
        last = info[j + 1]
      end
    end
  end
  epoch = ARGV[7]
  start = last
  changed = true
end

local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local seq = 0
local lms, lseq = parse_id(last)
if ms <= lms then
  ms = lms
  seq = lseq + 1
end

local answers = {}
local prev = last
local refused = false
local revoked = false
for b = 1, #batches do
  local batch = batches[b]
  if refused then
    answers[b] = '!' .. refused
  else
    local seen = batch.key and redis.call('GET', batch.key)
    if seen then
      -- A write, so that a WAIT after this call (--redis-wait-replicas) covers the first
      -- publish too: replicas apply writes in order. The key's window restarts.
      redis.call('PEXPIRE', batch.key, ARGV[4])
      answers[b] = '=' .. seen
    else
      local id = string.format('%d-%d', ms, seq + batch.count - 1)
      local added = redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], id, 'v', '2', 'x', epoch,
        'p', prev, 'e', batch.blob, 'o', string.format('%s:%d', origin, number + b - 1))
      if type(added) == 'table' and added.err then
        refused = added.err
        answers[b] = '!' .. refused
      else
        for j = 0, batch.logout_count - 1 do
          redis.call('ZADD', KEYS[3], ms, ARGV[batch.logouts + j])
          revoked = true
        end
        local first = string.format('%d-%d', ms, seq)
        if batch.key then
          redis.call('SET', batch.key, batch.body .. ' ' .. first .. ' ' .. epoch, 'PX', ARGV[4])
        end
        answers[b] = '+' .. first .. ' ' .. epoch
        prev = id
        seq = seq + batch.count
      end
    end
  end
end
if prev ~= last or changed then
  head = prev .. ' ' .. epoch .. ' ' .. start
  redis.call('SET', KEYS[2], head)
end
if revoked then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ms - tonumber(ARGV[2]))
  redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -1 - tonumber(ARGV[8]))
end
table.insert(answers, 1, head)
return answers

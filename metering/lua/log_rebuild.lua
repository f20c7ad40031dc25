-- Log mode's counter rebuild (metering.appender.rebuild): set each missing counter to what the database holds plus
-- the stream's entries the drainer has not persisted yet, in one atomic call, so nothing appended meanwhile is lost
-- or counted twice: an append before this call is in the stream (after the cursor) and found here; an append after
-- it finds the counter and adds to it.
--
-- KEYS: [1] the tree's state hash, [2] the tree's stream, then the counters to set (the tree's hash tag).
-- ARGV: [1] the epoch the counters belong to, [2] the id of the last entry the database holds (LogCursor.last_entry,
--       read with the cursor row locked), [3] the counters' TTL in seconds, [4] a deadline in microseconds of this
--       server's clock (TIME): the caller read the clock right before sending this call and added its socket
--       timeout, so a call that runs by then runs while the caller still waits, i.e. still holds the cursor row
--       and the tree lock. One that runs later (the server stalled, the caller gave up and released its locks: a
--       drainer may since have persisted and trimmed entries its sums do not have) is refused, then 5 values per counter: the database's
--       units (a decimal string); the level's tenant pk whose entries count ('' : none, e.g. reserved counters);
--       the feature; the window's start and end as integer microseconds since 1970 ('' : open).
-- Returns: {0}            the state hash is missing (open the tree first)
--          {1, epoch}     the tree's epoch is another: counters of this epoch must not be created now
--          {3}            past the deadline: nothing set (read again)
--          {2, set, entries}  done: how many counters were created (an existing one is newer: left alone), and how
--                         many stream entries were read
local state, stream = KEYS[1], KEYS[2]
local epoch = redis.call('HGET', state, 'epoch')
if not epoch then return {0} end
if epoch ~= ARGV[1] then return {1, epoch} end
local now = redis.call('TIME')
if tonumber(now[1]) * 1000000 + tonumber(now[2]) > tonumber(ARGV[4]) then return {3} end
local ttl = tonumber(ARGV[3])
local counters = #KEYS - 2
local totals, wanted = {}, {}
for i = 1, counters do
    local base = 4 + 5 * (i - 1)
    totals[i] = big(ARGV[base + 1])
    if ARGV[base + 2] ~= '' then
        wanted[i] = {
            level = '/' .. ARGV[base + 2] .. '/',
            feature = ARGV[base + 3],
            first = ARGV[base + 4] ~= '' and tonumber(ARGV[base + 4]) or nil,
            last = ARGV[base + 5] ~= '' and tonumber(ARGV[base + 5]) or nil,
        }
    end
end
local entries = redis.call('XRANGE', stream, '(' .. ARGV[2], '+')
for _, entry in ipairs(entries) do
    local values = {}
    local flat = entry[2]
    for j = 1, #flat, 2 do values[flat[j]] = flat[j + 1] end
    local path, feature, units, at = values['p'] or '', values['f'], values['u'] or '0', tonumber(values['ts'] or '0')
    for i = 1, counters do
        local want = wanted[i]
        if want and feature == want.feature and string.find(path, want.level, 1, true)
            and (want.first == nil or at >= want.first) and (want.last == nil or at < want.last) then
            totals[i] = big_add(totals[i], units)
        end
    end
end
local created = 0
for i = 1, counters do
    if redis.call('SET', KEYS[2 + i], totals[i], 'NX', 'EX', ttl) then created = created + 1 end
end
return {2, created, #entries}

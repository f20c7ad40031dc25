-- Log mode's write (metering.appender.attempt): in one atomic call, decide every limit handed to it, count, de-duplicate
-- the transaction id and append the fact to its tree's stream. Generic: the limits are counters and amounts (the
-- quotas app turns its rules into them); nothing here knows what a quota is.
--
-- KEYS: [1] the tree's state hash (metering.log.state_key), [2] the de-duplication key (log.dedup_key), [3] the
--       stream (log.stream_key), [4] the listed flag (log.listed_key); then for each limit its (used, reserved)
--       counters; then the usage counters to add to; then the reserved counters to add to. Every key carries the
--       tree's hash tag (one Redis Cluster slot). Without an entry (a check, a reservation) KEYS[2..4] are unused.
-- ARGV: [1] the caller's epoch, [2] de-duplication seconds, [3] limits, [4] usage keys, [5] reserved keys,
--       [6] usage delta, [7] reserved delta, [8] units to check, [9] listed flag seconds, [10] entry field/value
--       strings (0: append nothing), then (limit, hard) per limit, then the entry's field/value pairs
--       (metering.log.Entry.encode). Amounts are decimal strings of integer units (bignum.lua: exact at any size).
-- Returns: {0}                                  the state hash is missing: open the tree (metering.drain.open_tree)
--          {1, epoch}                           the caller's epoch is not the tree's (Redis holds this one)
--          {2, entry id}                        the transaction id is in the window: a duplicate of that entry
--          {3, key index, ...}                  counters of the limits are missing: rebuild them, then retry
--          {4, limit index, used, reserved}     refused by that limit; nothing changed
--          {5, entry id or '', listed, used_1, reserved_1, ...}  admitted and counted (listed = 1: the tree was not
--                                               flagged as listed, the caller SADDs it to the work list)
local state, dedup, stream, listed = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local epoch = redis.call('HGET', state, 'epoch')
if not epoch then return {0} end
if epoch ~= ARGV[1] then return {1, epoch} end
local fields = tonumber(ARGV[10])
if fields > 0 then
    local existing = redis.call('GET', dedup)
    if existing then return {2, existing} end
end
local limits, used_keys, reserved_keys = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local used_delta, reserved_delta, check = ARGV[6], ARGV[7], ARGV[8]
local first_key = 4
local missing = {3}
for i = 1, 2 * limits do
    if redis.call('EXISTS', KEYS[first_key + i]) == 0 then missing[#missing + 1] = i end
end
if #missing > 1 then return missing end
local before = {}
for i = 1, limits do
    local used = big(redis.call('GET', KEYS[first_key + 2 * i - 1]))
    local reserved = big(redis.call('GET', KEYS[first_key + 2 * i]))
    local limit, hard = ARGV[9 + 2 * i], ARGV[10 + 2 * i]
    if hard == '1' and big_compare(big_add(big_add(used, reserved), check), limit) > 0 then
        return {4, i, used, reserved}
    end
    before[#before + 1] = used
    before[#before + 1] = reserved
end
local offset = first_key + 2 * limits
add_to_existing(offset + 1, offset + used_keys, used_delta)
offset = offset + used_keys
add_to_existing(offset + 1, offset + reserved_keys, reserved_delta)
local entry_id, newly_listed = '', 0
if fields > 0 then
    local pairs_at = 11 + 2 * limits
    entry_id = redis.call('XADD', stream, '*', unpack(ARGV, pairs_at, pairs_at + fields - 1))
    redis.call('SET', dedup, entry_id, 'EX', tonumber(ARGV[2]))
    if redis.call('SET', listed, '1', 'NX', 'EX', tonumber(ARGV[9])) then newly_listed = 1 end
end
local answer = {5, entry_id, newly_listed}
for i = 1, #before do answer[#answer + 1] = before[i] end
return answer

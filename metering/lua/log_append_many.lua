-- Log mode's batch write (metering.appender.append_many): in one atomic call, de-duplicate, count and append a batch
-- of facts of ONE tree to its stream (no quota decision: batches report usage that already happened). All the
-- batch's facts of the tree are appended, or none (a stale epoch or a missing state changes nothing).
--
-- KEYS: [1] the tree's state hash (metering.log.state_key), [2] the stream (log.stream_key), [3] the listed flag
--       (log.listed_key); then per fact: its de-duplication key (log.dedup_key), then the usage counters it adds to
--       (counters.keys_for_fact). Every key carries the tree's hash tag (one Redis Cluster slot).
-- ARGV: [1] the caller's epoch, [2] de-duplication seconds, [3] listed flag seconds, [4] the number of facts; then
--       per fact: the number of its counter keys, its units (a decimal string), the number of its entry field/value
--       strings, then those strings (metering.log.Entry.encode).
-- Returns: {0}                    the state hash is missing: open the tree (metering.drain.open_tree); nothing changed
--          {1, epoch}             the caller's epoch is not the tree's (Redis holds this one); nothing changed
--          {5, listed, s_1, id_1, s_2, id_2, ...}  per fact, in order: s = 1 appended as entry id, s = 2 a duplicate
--                                 of entry id (its transaction id is in the window; not counted, not appended);
--                                 listed = 1: the tree was not flagged as listed, the caller SADDs it to the work list
local state, stream, listed = KEYS[1], KEYS[2], KEYS[3]
local epoch = redis.call('HGET', state, 'epoch')
if not epoch then return {0} end
if epoch ~= ARGV[1] then return {1, epoch} end
local facts = tonumber(ARGV[4])
-- First every read (the de-duplication keys), then every write: an error in the reads (a key of the wrong type, say)
-- aborts the script before it changed anything (Redis does not undo a script's writes made before an error).
local plan = {}
local key_at, arg_at = 4, 5
for f = 1, facts do
    local count, fields = tonumber(ARGV[arg_at]), tonumber(ARGV[arg_at + 2])
    plan[f] = {key_at, count, arg_at, fields, redis.call('GET', KEYS[key_at])}
    key_at = key_at + 1 + count
    arg_at = arg_at + 3 + fields
end
local answer = {5, 0}
local appended = 0
for f = 1, facts do
    local at, count, args, fields, existing = plan[f][1], plan[f][2], plan[f][3], plan[f][4], plan[f][5]
    if existing then
        answer[#answer + 1] = 2
        answer[#answer + 1] = existing
    else
        add_to_existing(at + 1, at + count, ARGV[args + 1])
        local id = redis.call('XADD', stream, '*', unpack(ARGV, args + 3, args + 2 + fields))
        redis.call('SET', KEYS[at], id, 'EX', tonumber(ARGV[2]))
        answer[#answer + 1] = 1
        answer[#answer + 1] = id
        appended = appended + 1
    end
end
if appended > 0 and redis.call('SET', listed, '1', 'NX', 'EX', tonumber(ARGV[3])) then answer[2] = 1 end
return answer

-- Take a tree off the drainer's work list only when its stream is empty (metering.drain._unlist).
-- KEYS[1]: the tree's stream (log.stream_key); KEYS[2]: its listed flag (log.listed_key). No ARGV.
-- The caller has already SREMed the tree from the work list. Empty stream: delete the flag, so the next writer that
-- appends sees it absent and lists the tree again; returns 0. Entries left: returns 1 (the caller SADDs it back).
-- Run atomically, so a writer's append is either seen here (1) or finds the flag gone (it lists the tree itself).
if redis.call('EXISTS', KEYS[1]) == 1 and redis.call('XLEN', KEYS[1]) > 0 then return 1 end
redis.call('DEL', KEYS[2])
return 0

-- Set a tree's log state after its (re)opening committed (metering.drain.open_tree).
-- KEYS[1]: the tree's state hash (log.state_key).
-- ARGV[1]: the generation the opener saw under its lock ('' when the hash was missing); ARGV[2]: the new
--          generation; ARGV[3]: the tree's counter epoch after the opening (the database's).
-- Set only if the hash still holds what the opener saw: a slower opener whose commit came first must not write its
-- state over a later one's. Returns 1 when set, 0 when another opener got there first.
local seen = redis.call('HGET', KEYS[1], 'gen') or ''
if seen ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'gen', ARGV[2], 'epoch', ARGV[3])
return 1

-- Log mode: tell Redis the tree's counter epoch the database committed (metering.appender.push_epoch).
--
-- Pushes are not ordered (two processes may push two epochs read at different moments), and epochs are random, not
-- increasing: so an epoch once replaced is remembered as retired and never accepted again — a late push of an older
-- epoch would otherwise bring back counters that missed everything counted since. The retired set lives as long as
-- the counters of a retired epoch can (their TTL, refreshed at each push).
--
-- KEYS: [1] the tree's state hash, [2] the tree's retired epochs (a set), both under the tree's hash tag.
-- ARGV: [1] the epoch, [2] the retired set's lifetime in seconds.
-- Returns: 0  the state hash is missing: nothing done (the next writer opens the tree)
--          1  the state holds this epoch (now, or already)
--          2  refused: this epoch was retired (the caller's read is older than another push: read again)
local current = redis.call('HGET', KEYS[1], 'epoch')
if not current then return 0 end
if current == ARGV[1] then return 1 end
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then return 2 end
redis.call('SADD', KEYS[2], current)
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[2]))
redis.call('HSET', KEYS[1], 'epoch', ARGV[1])
return 1

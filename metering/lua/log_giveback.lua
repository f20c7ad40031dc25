-- Give back to the live counters the units of stream entries that did not become facts (metering.drain): a
-- duplicate transaction id (the database already had it: admitted outside the Redis de-duplication window) or a
-- dead entry (its tenant is gone). The writer counted them when it admitted them; facts == counters needs them out.
-- KEYS: for each entry, its marker key first (<tag>:giveback:<generation>:<entry id>), then the counters to lower
--       (counters.keys_for_fact: every level x window, possibly under two epochs), all under one tree's hash tag.
-- ARGV[1]: the markers' TTL in seconds.
-- ARGV[2..]: per entry, two values: the number of counter keys after its marker, and the delta to add (minus its units, a decimal string).
-- An entry whose marker already exists was given back before (its drain transaction then failed and the entry is
-- drained again): nothing is lowered twice. Only existing counters change (a missing one is built by a rebuild).
-- Returns the number of entries given back now.
local given = 0
local position = 1
for index = 2, #ARGV, 2 do
    local count = tonumber(ARGV[index])
    local delta = ARGV[index + 1]
    if redis.call('SET', KEYS[position], '1', 'NX', 'EX', ARGV[1]) then
        add_to_existing(position + 1, position + count, delta)
        given = given + 1
    end
    position = position + count + 1
end
return given

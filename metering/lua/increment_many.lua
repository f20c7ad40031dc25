-- Add a batch of facts to the live counters of one tree (metering.bulk.add_many_to_counters): the batch's units
-- summed per counter key in Python first, so each key is changed once per batch.
-- KEYS: the counters (every level x hour, day, month, total of every fact), under one tree's hash tag, each once.
-- ARGV[i]: the units to add to KEYS[i], a decimal string.
-- Only existing counters change: a missing one is created by a rebuild, which sums the committed rollups.
for index = 1, #KEYS do
    add_to_existing(index, index, ARGV[index])
end
return #KEYS

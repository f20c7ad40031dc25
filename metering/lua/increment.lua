-- Add a fact's units to the live counters of every level (metering.recorder.count).
-- KEYS: the counters (every level x hour, day, month, total), under one tree's hash tag.
-- ARGV[1]: the units to add, a decimal string.
-- Only existing counters change: a missing one is created by a rebuild, which sums the committed rollups.
add_to_existing(1, #KEYS, ARGV[1])
return 0

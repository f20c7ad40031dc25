-- One quota decision over every level of a lineage: check all, count all or none (quotas.ledger.decide).
--
-- KEYS: for each rule its (used, reserved) counters; then the usage counters to add to; then the reserved counters
--       to add to. All share the tree's hash tag and carry its counter epoch (metering.counters).
-- ARGV: [1] rules, [2] usage keys, [3] reserved keys, [4] usage delta, [5] reserved delta, [6] units to check,
--       then (limit, hard) per rule. Every amount is a decimal string of integer units, compared and added exactly
--       (bignum.lua).
-- Returns: {1, used_1, reserved_1, ...}  allowed and counted; the counters before, per rule
--          {0, missing key index, ...}   counters are missing: rebuild them from the database and decide again
--          {2, rule index, used, reserved} refused by that rule; nothing counted
local rules, used_keys, reserved_keys = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local used_delta, reserved_delta, check = ARGV[4], ARGV[5], ARGV[6]
local missing = {}
for i = 1, 2 * rules do
    if redis.call('EXISTS', KEYS[i]) == 0 then missing[#missing + 1] = i end
end
if #missing > 0 then return {0, unpack(missing)} end
local before = {1}
for i = 1, rules do
    local used = big(redis.call('GET', KEYS[2 * i - 1]))
    local reserved = big(redis.call('GET', KEYS[2 * i]))
    local limit, hard = ARGV[5 + 2 * i], ARGV[6 + 2 * i]
    if hard == '1' and big_compare(big_add(big_add(used, reserved), check), limit) > 0 then
        return {2, i, used, reserved}
    end
    before[#before + 1] = used
    before[#before + 1] = reserved
end
local offset = 2 * rules
add_to_existing(offset + 1, offset + used_keys, used_delta)
offset = offset + used_keys
add_to_existing(offset + 1, offset + reserved_keys, reserved_delta)
return before

-- One quota decision over every level of a lineage: check all, count all or none (quotas.ledger.decide).
--
-- KEYS: for each rule its (used, reserved) counters; then the usage counters to add to; then the reserved counters
--       to add to; then, when ARGV carries a rules token, the tree's rules token key. All share the tree's hash tag.
-- ARGV: [1] rules, [2] usage keys, [3] reserved keys, [4] usage delta, [5] reserved delta, [6] units to check,
--       then (limit, hard) per rule, then the rules token the caller read its rules under ('' when none).
--       Every amount is a decimal string of integer units, compared and added exactly (bignum.lua).
-- Returns: {1, used_1, reserved_1, ...}  allowed and counted; the counters before, per rule
--          {0, missing key index, ...}   counters are missing: rebuild them from the database and decide again
--          {2, rule index, used, reserved} refused by that rule; nothing counted
--          {3}                            the caller's rules are stale: reload them and decide again
local rules, used_keys, reserved_keys = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local used_delta, reserved_delta, check = ARGV[4], ARGV[5], ARGV[6]
local token = ARGV[7 + 2 * rules]
if token ~= '' and redis.call('GET', KEYS[#KEYS]) ~= token then return {3} end
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

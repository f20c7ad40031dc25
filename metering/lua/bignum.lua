-- Exact integer arithmetic on decimal strings, shared by every counter script (prepended to it).
--
-- Why: Lua numbers in Redis are IEEE doubles, exact only below 2^53 (about 9 x 10^9 quantity in millionths), and
-- INCRBY stops at 2^63. Counters are therefore decimal strings ("0", "123", "-45", no leading zeros), and every
-- sum and comparison here works on groups of 7 digits, whose sums stay far below 2^53: exact at any size.
local GROUP = 7
local BASE = 10000000

-- A counter or argument as a canonical string: a missing key (false) or an empty value is "0".
local function big(value)
    if value == false or value == nil or value == '' then return '0' end
    return value
end

local function sign_and_magnitude(value)
    if string.sub(value, 1, 1) == '-' then return -1, string.sub(value, 2) end
    return 1, value
end

-- Little-endian groups of GROUP digits.
local function groups(magnitude)
    local out, stop = {}, #magnitude
    while stop > 0 do
        local start = math.max(1, stop - GROUP + 1)
        out[#out + 1] = tonumber(string.sub(magnitude, start, stop))
        stop = start - 1
    end
    return out
end

local function join(parts)
    local top = #parts
    while top > 1 and parts[top] == 0 do top = top - 1 end
    local out = {string.format('%d', parts[top])}
    for index = top - 1, 1, -1 do out[#out + 1] = string.format('%07d', parts[index]) end
    return table.concat(out)
end

local function compare_magnitudes(a, b)
    if #a ~= #b then return (#a < #b) and -1 or 1 end
    local ga, gb = groups(a), groups(b)
    for index = #ga, 1, -1 do
        if ga[index] ~= gb[index] then return (ga[index] < gb[index]) and -1 or 1 end
    end
    return 0
end

local function add_magnitudes(a, b)
    local ga, gb, out, carry = groups(a), groups(b), {}, 0
    for index = 1, math.max(#ga, #gb) do
        local sum = (ga[index] or 0) + (gb[index] or 0) + carry
        if sum >= BASE then out[index], carry = sum - BASE, 1 else out[index], carry = sum, 0 end
    end
    if carry > 0 then out[#out + 1] = carry end
    return join(out)
end

-- a - b for magnitudes a >= b.
local function subtract_magnitudes(a, b)
    local ga, gb, out, borrow = groups(a), groups(b), {}, 0
    for index = 1, #ga do
        local difference = ga[index] - (gb[index] or 0) - borrow
        if difference < 0 then out[index], borrow = difference + BASE, 1 else out[index], borrow = difference, 0 end
    end
    return join(out)
end

local function with_sign(sign, magnitude)
    if sign < 0 and magnitude ~= '0' then return '-' .. magnitude end
    return magnitude
end

-- a + b, both decimal strings of any size and sign.
local function big_add(a, b)
    local sa, ma = sign_and_magnitude(big(a))
    local sb, mb = sign_and_magnitude(big(b))
    if sa == sb then return with_sign(sa, add_magnitudes(ma, mb)) end
    local order = compare_magnitudes(ma, mb)
    if order == 0 then return '0' end
    if order > 0 then return with_sign(sa, subtract_magnitudes(ma, mb)) end
    return with_sign(sb, subtract_magnitudes(mb, ma))
end

-- -1, 0 or 1 as a < b, a == b, a > b.
local function big_compare(a, b)
    local sa, ma = sign_and_magnitude(big(a))
    local sb, mb = sign_and_magnitude(big(b))
    if ma == '0' then sa = 1 end
    if mb == '0' then sb = 1 end
    if sa ~= sb then return (sa < sb) and -1 or 1 end
    local order = compare_magnitudes(ma, mb)
    if sa < 0 then return -order end
    return order
end

-- Add delta to every existing key of the list (a missing counter is left missing: only a rebuild creates one).
local function add_to_existing(first, last, delta)
    if delta == '0' then return end
    for index = first, last do
        local value = redis.call('GET', KEYS[index])
        if value then redis.call('SET', KEYS[index], big_add(value, delta), 'KEEPTTL') end
    end
end

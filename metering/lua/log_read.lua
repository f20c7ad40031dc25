-- Read one drain batch of a tree's log in one round trip (metering.drain._drain_batch).
-- KEYS[1]: the tree's stream (log.stream_key); KEYS[2]: its state hash (log.state_key).
-- ARGV[1]: the cursor (the last persisted id; entries strictly after it are read); ARGV[2]: the durability delay
--          in milliseconds (only entries at least that old by this server's TIME are returned); ARGV[3]: at most
--          this many entries; ARGV[4]: '1' to first delete the entries up to the cursor (committed, so persisted:
--          leftovers of a drainer that died between its commit and its trim), '0' when the cursor may not be
--          committed yet (a drain inside an enclosing transaction).
--          ARGV[5]: the cursor's generation (the trim happens only when the state hash names it: entries of
--          another generation are not known to be persisted).
-- Returns {gen, epoch, last-generated id, entries, length}: gen/epoch of the state hash ('' when missing), the
-- stream's last-generated id ('' when the stream does not exist), XRANGE's [id, [field, value, ...]] list, and the
-- stream's length after the trim (so the entries after the cursor, when it trimmed).
-- The id right after id "ms-seq" (sequence numbers go to 2^64 - 1, beyond a Lua number's exact range: as a string).
local function next_id(id)
    local ms, seq = string.match(id, '^(%d+)-(%d+)$')
    if seq == '18446744073709551615' then return string.format('%d', tonumber(ms) + 1) .. '-0' end
    local out, carry = '', 1
    for index = #seq, 1, -1 do
        local digit = tonumber(string.sub(seq, index, index)) + carry
        if digit == 10 then digit, carry = 0, 1 else carry = 0 end
        out = tostring(digit) .. out
    end
    if carry == 1 then out = '1' .. out end
    return ms .. '-' .. out
end

local state = redis.call('HMGET', KEYS[2], 'gen', 'epoch')
local last = ''
local entries = {}
local length = 0
if redis.call('EXISTS', KEYS[1]) == 1 then
    if ARGV[4] == '1' and ARGV[1] ~= '0-0' and ARGV[5] ~= '' and state[1] == ARGV[5] then
        redis.call('XTRIM', KEYS[1], 'MINID', next_id(ARGV[1]))
    end
    length = redis.call('XLEN', KEYS[1])
    local info = redis.call('XINFO', 'STREAM', KEYS[1])
    for index = 1, #info, 2 do
        if info[index] == 'last-generated-id' then last = info[index + 1] end
    end
    local now = redis.call('TIME')
    local cutoff = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - tonumber(ARGV[2])
    if cutoff >= 0 then
        entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], string.format('%d', cutoff), 'COUNT', ARGV[3])
    end
end
return {state[1] or '', state[2] or '', last, entries, length}

//! The journal's writes as Lua scripts: each runs atomically in Redis (and is one
//! MULTI/EXEC in its append-only file), so a fence check and the write it guards can never be
//! split by another writer, and a crash of the server or of this process leaves each write
//! wholly there or wholly absent.
//!
//! Every script takes the key prefix `P` (`soma:{<cluster>}`) as `ARGV[1]`; keys are built
//! inside the script from it. All keys of a journal share the hash tag `{<cluster>}`, so they
//! would live in one slot of a Redis Cluster; the scripts do not declare them as `KEYS`, so
//! the journal needs a standalone Redis (or one that allows undeclared keys). The layout (`<key>` is the journal key, `<r>` its
//! range):
//!
//! - `P:shard:<r>` hash `{epoch, node, incarnation}`: the range's owner epoch (shared with
//!   [`crate::Shards`]); a write is accepted only at the current epoch while `node` is set
//!   and, for a cluster node (incarnation above 0), while its lease `P:lease:<node>` still
//!   holds that incarnation: a node paused past its lease writes nothing, taken over or not;
//! - `P:k:<key>` hash `{last, applied, state, fseq, fcount, replay}`: the last assigned seq,
//!   the committed seq and state, the failure count of the message it is stuck on, the seq
//!   its last replay began at;
//! - `P:i:<key>` stream of the unacknowledged messages, entry id `0-<seq>`, field `p`;
//!   deleted once empty;
//! - `P:pend:<r>` / `P:stated:<r>` sets of the range's keys with pending messages / a
//!   committed state;
//! - `P:dl:<key>` hash of dead letters (`<seq>:p|e|a|t`: payload, error, attempts, time) and
//!   `P:dlkeys`, a sorted set (all scores 0, so in key order) of keys that have some;
//! - `P:tm:<r>` sorted set of timers by fire time, member `<id>:<key>`; `P:tmd:<r>` hash
//!   member -> payload; `P:tk:<key>` set of the key's members;
//! - `P:open:<node>`: set while a journal of that node name is open (a crash leaves it).
//!
//! Replies are tables whose first element says what happened: `ok`, `stale` (range, epoch
//! held, current epoch or false when nobody holds it), `lease` (range: the holder's lease
//! expired), `notnext` (applied), `missing`,
//! `beyond` (last), `nosuch`, `gone`.

use std::sync::LazyLock;

use redis::Script;

/// Shared by every writing script: the fence and the append of one message.
const PRELUDE: &str = r"
local P = ARGV[1]
local function fence(r, epoch)
    local cur = redis.call('HMGET', P .. ':shard:' .. r, 'epoch', 'node', 'incarnation')
    local held = cur[2] and cur[2] ~= ''
    if held and cur[1] == epoch then
        -- A cluster node (incarnation above 0) writes only while its lease lives.
        if cur[3] and cur[3] ~= '0'
            and redis.call('GET', P .. ':lease:' .. cur[2]) ~= cur[3] then
            return {'lease', r, epoch, false}
        end
        return nil
    end
    if held then return {'stale', r, epoch, cur[1]} end
    return {'stale', r, epoch, false}
end
local function push(r, key, payload)
    local seq = redis.call('HINCRBY', P .. ':k:' .. key, 'last', 1)
    redis.call('XADD', P .. ':i:' .. key, '0-' .. string.format('%d', seq), 'p', payload)
    redis.call('SADD', P .. ':pend:' .. r, key)
    return seq
end
local function applied_of(key)
    return tonumber(redis.call('HGET', P .. ':k:' .. key, 'applied') or '0')
end
local function trim(r, key, upto)
    local inbox = P .. ':i:' .. key
    redis.call('XTRIM', inbox, 'MINID', '0-' .. string.format('%d', upto + 1))
    if redis.call('XLEN', inbox) == 0 then
        redis.call('DEL', inbox)
        redis.call('SREM', P .. ':pend:' .. r, key)
    end
end
";

fn script(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}\n{body}"))
}

/// `ARGV`: P, node, ranges...: bumps each range's epoch and marks it held by `node`.
pub(super) static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
        local out = {}
        for i = 3, #ARGV do
            local shard = P .. ':shard:' .. ARGV[i]
            out[#out + 1] = redis.call('HINCRBY', shard, 'epoch', 1)
            redis.call('HSET', shard, 'node', ARGV[2], 'incarnation', 0)
        end
        return out
        ",
    )
});

/// `ARGV`: P, range, epoch: gives the range up if held at `epoch`.
pub(super) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
        local f = fence(ARGV[2], ARGV[3])
        if f then return f end
        redis.call('HSET', P .. ':shard:' .. ARGV[2], 'node', '')
        return {'ok'}
        ",
    )
});

/// `ARGV`: P, n, then n times (range, epoch, key, payload). All fences are checked before
/// anything is written: a stale entry refuses the whole batch. Reply `{'ok', seq...}`.
pub(super) static APPEND: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
        local n = tonumber(ARGV[2])
        local checked = {}
        for i = 0, n - 1 do
            local b = 3 + i * 4
            local tag = ARGV[b] .. '/' .. ARGV[b + 1]
            if not checked[tag] then
                local f = fence(ARGV[b], ARGV[b + 1])
                if f then f[#f + 1] = ARGV[b + 2]; return f end
                checked[tag] = true
            end
        end
        local out = {'ok'}
        for i = 0, n - 1 do
            local b = 3 + i * 4
            out[#out + 1] = push(ARGV[b], ARGV[b + 2], ARGV[b + 3])
        end
        return out
        ",
    )
});

/// `ARGV`: P, key, from, limit: `{applied, last, id, payload, id, payload...}` with the
/// entries at `max(from, applied + 1)` onwards.
pub(super) static PENDING: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local P = ARGV[1]
        local cur = redis.call('HMGET', P .. ':k:' .. ARGV[2], 'applied', 'last')
        local applied = tonumber(cur[1] or '0')
        local last = tonumber(cur[2] or '0')
        local from = math.max(tonumber(ARGV[3]), applied + 1)
        local out = {applied, last}
        if from > last then return out end
        local entries = redis.call('XRANGE', P .. ':i:' .. ARGV[2],
            '0-' .. string.format('%d', from), '+', 'COUNT', ARGV[4])
        for _, e in ipairs(entries) do
            out[#out + 1] = e[1]
            out[#out + 1] = e[2][2]
        end
        return out
        ",
    )
});

/// `ARGV`: P, range, epoch, key, from, seq, state, then (fire_at, member, payload)...
pub(super) static COMMIT: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
        local r, key = ARGV[2], ARGV[4]
        local f = fence(r, ARGV[3])
        if f then return f end
        local k = P .. ':k:' .. key
        local applied = applied_of(key)
        if tonumber(ARGV[5]) ~= applied + 1 then return {'notnext', applied} end
        local seq = tonumber(ARGV[6])
        local last = tonumber(redis.call('HGET', k, 'last') or '0')
        if seq > last or seq < tonumber(ARGV[5]) then return {'beyond', last} end
        redis.call('HSET', k, 'applied', ARGV[6], 'state', ARGV[7])
        redis.call('HDEL', k, 'fseq', 'fcount')
        trim(r, key, seq)
        redis.call('SADD', P .. ':stated:' .. r, key)
        for i = 8, #ARGV, 3 do
            local member = ARGV[i + 1]
            redis.call('ZADD', P .. ':tm:' .. r, ARGV[i], member)
            redis.call('HSET', P .. ':tmd:' .. r, member, ARGV[i + 2])
            redis.call('SADD', P .. ':tk:' .. key, member)
        end
        return {'ok'}
        ",
    )
});

/// `ARGV`: P, key, seq: the failure count of (key, seq), counted from 1 for a new seq.
pub(super) static FAILURE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local k = ARGV[1] .. ':k:' .. ARGV[2]
        local cur = redis.call('HMGET', k, 'fseq', 'fcount')
        local n = 1
        if cur[1] == ARGV[3] then n = tonumber(cur[2] or '0') + 1 end
        redis.call('HSET', k, 'fseq', ARGV[3], 'fcount', n)
        return n
        ",
    )
});

/// `ARGV`: P, then (key, seq)...: per key 1 when its replay began at the same seq before.
pub(super) static REPLAYS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local out = {}
        for i = 2, #ARGV, 2 do
            local k = ARGV[1] .. ':k:' .. ARGV[i]
            local same = redis.call('HGET', k, 'replay') == ARGV[i + 1]
            redis.call('HSET', k, 'replay', ARGV[i + 1])
            out[#out + 1] = same and 1 or 0
        end
        return out
        ",
    )
});

/// `ARGV`: P, range, epoch, key, seq, error, attempts, at_ms.
pub(super) static DEAD_LETTER: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
        local r, key, seq = ARGV[2], ARGV[4], ARGV[5]
        local f = fence(r, ARGV[3])
        if f then return f end
        local applied = applied_of(key)
        if tonumber(seq) ~= applied + 1 then return {'notnext', applied} end
        local e = redis.call('XRANGE', P .. ':i:' .. key, '0-' .. seq, '0-' .. seq)
        if #e == 0 then return {'missing'} end
        redis.call('HSET', P .. ':dl:' .. key, seq .. ':p', e[1][2][2], seq .. ':e', ARGV[6],
            seq .. ':a', ARGV[7], seq .. ':t', ARGV[8])
        redis.call('ZADD', P .. ':dlkeys', 0, key)
        local k = P .. ':k:' .. key
        redis.call('HSET', k, 'applied', seq)
        redis.call('HDEL', k, 'fseq', 'fcount')
        trim(r, key, tonumber(seq))
        return {'ok'}
        ",
    )
});

/// `ARGV`: P, prefix: `{key, {field, value...}}...` of the dead letters of keys starting
/// with `prefix`, in key order.
pub(super) static DEAD_LETTERS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local P, prefix = ARGV[1], ARGV[2]
        local min = '-'
        if prefix ~= '' then min = '[' .. prefix end
        local out = {}
        for _, key in ipairs(redis.call('ZRANGEBYLEX', P .. ':dlkeys', min, '+')) do
            if string.sub(key, 1, #prefix) ~= prefix then break end
            out[#out + 1] = key
            out[#out + 1] = redis.call('HGETALL', P .. ':dl:' .. key)
        end
        return out
        ",
    )
});

/// `ARGV`: P, range, epoch, key, seq, again (1: append its payload anew, 0: discard it).
pub(super) static TAKE_DEAD_LETTER: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
        local r, key, seq = ARGV[2], ARGV[4], ARGV[5]
        local f = fence(r, ARGV[3])
        if f then return f end
        local dl = P .. ':dl:' .. key
        local payload = redis.call('HGET', dl, seq .. ':p')
        if not payload then return {'nosuch'} end
        redis.call('HDEL', dl, seq .. ':p', seq .. ':e', seq .. ':a', seq .. ':t')
        if redis.call('HLEN', dl) == 0 then redis.call('ZREM', P .. ':dlkeys', key) end
        if ARGV[6] == '1' then return {'ok', push(r, key, payload)} end
        return {'ok'}
        ",
    )
});

/// `ARGV`: P, range, now, limit: `{member, score, payload}...` of the due timers.
pub(super) static DUE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local P, r = ARGV[1], ARGV[2]
        local due = redis.call('ZRANGEBYSCORE', P .. ':tm:' .. r, '-inf', ARGV[3],
            'WITHSCORES', 'LIMIT', 0, ARGV[4])
        local out = {}
        for i = 1, #due, 2 do
            out[#out + 1] = due[i]
            out[#out + 1] = due[i + 1]
            out[#out + 1] = redis.call('HGET', P .. ':tmd:' .. r, due[i]) or ''
        end
        return out
        ",
    )
});

/// `ARGV`: P, range, epoch, key, member: `{'ok', seq}`, or `{'gone'}` if already fired.
pub(super) static FIRE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
        local r, key, member = ARGV[2], ARGV[4], ARGV[5]
        local f = fence(r, ARGV[3])
        if f then return f end
        if redis.call('ZREM', P .. ':tm:' .. r, member) == 0 then return {'gone'} end
        local payload = redis.call('HGET', P .. ':tmd:' .. r, member) or ''
        redis.call('HDEL', P .. ':tmd:' .. r, member)
        redis.call('SREM', P .. ':tk:' .. key, member)
        return {'ok', push(r, key, payload)}
        ",
    )
});

/// `ARGV`: P, range, epoch, key: `{'ok', count}` after removing every timer of the key.
pub(super) static DISCARD_TIMERS: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
        local r, key = ARGV[2], ARGV[4]
        local f = fence(r, ARGV[3])
        if f then return f end
        local tk = P .. ':tk:' .. key
        local members = redis.call('SMEMBERS', tk)
        for _, m in ipairs(members) do
            redis.call('ZREM', P .. ':tm:' .. r, m)
            redis.call('HDEL', P .. ':tmd:' .. r, m)
        end
        redis.call('DEL', tk)
        return {'ok', #members}
        ",
    )
});

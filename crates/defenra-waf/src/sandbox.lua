-- Builds the sandbox once per Lua state (see sandbox.rs). Runs in the state's real globals,
-- which scripts never see: every script runs in its own environment table whose __index is
-- the `sandbox` table returned here.
--
-- Everything a script can reach that is shared between requests or domains (string, table,
-- math, os, bit, ngx and its sub-tables, request) is a read-only userdata proxy made with
-- newproxy: rawset, table.insert and setmetatable all refuse userdata, and `__metatable`
-- hides the real table behind it.

local host = ...

local error, getmetatable, newproxy, pcall, xpcall, select, setmetatable, tostring, type =
    error, getmetatable, newproxy, pcall, xpcall, select, setmetatable, tostring, type
local collectgarbage = collectgarbage

local function readonly(real, name)
    local proxy = newproxy(true)
    local mt = getmetatable(proxy)
    mt.__index = real
    mt.__newindex = function(_, key)
        error("attempt to modify read-only table '" .. name .. "' (field '" .. tostring(key) .. "')", 2)
    end
    mt.__metatable = false
    mt.__tostring = function() return name end
    return proxy
end

-- The string metatable gives `("x"):rep(3)` access to the real string table: hide it.
string.dump = nil
getmetatable("").__metatable = false

-- Pattern matching is the agent's own (strlib.rs, pattern.rs): LuaJIT's is C code that
-- backtracks without bound and that no instruction hook can interrupt, while the agent's
-- charges its steps to the run's budget. Same results and messages.
string.find = host.str_find
string.match = host.str_match
string.gmatch = host.str_gmatch
string.gsub = host.str_gsub

-- Library functions written in C that call back into Lua (a replacement function or table,
-- a comparator, `__lt`, `__tostring`, `__index`) check on entry that the run has not used
-- too much C stack: each such callback nests C frames that the Lua stack limit does not
-- see, and a script recursing through them would overflow the thread's stack (sandbox.rs,
-- `api::MAX_C_STACK`). Every such recursion passes through one of these entries.
-- `string.gsub` is one of them: it is the agent's (below), which checks in Rust.
local c_stack_check = host.c_stack_check
do
    local format, sort, time = string.format, table.sort, os.time
    string.format = function(...)
        c_stack_check()
        return format(...)
    end
    table.sort = function(t, comp)
        c_stack_check()
        return sort(t, comp)
    end
    os.time = function(t)
        c_stack_check()
        return time(t)
    end
end

-- pcall/xpcall must not swallow ngx.exit or a budget abort: both are Lua errors underneath,
-- so a failed protected call re-raises when the host says the run is stopping.
local stopping = host.stopping
local function pass(ok, ...)
    if not ok and stopping() then
        error((...), 0)
    end
    return ok, ...
end
local function safe_pcall(f, ...)
    return pass(pcall(f, ...))
end
local function safe_xpcall(f, handler, ...)
    return pass(xpcall(f, handler, ...))
end

-- Per-request slots (ngx.ctx); the host clears this table before every run.
local slots = {}

local ngx_req = {
    get_headers = host.get_headers,
    get_method = host.get_method,
    get_uri_args = host.get_uri_args,
    start_time = host.start_time,
    -- The proxy streams bodies and never buffers one for the WAF.
    read_body = function() end,
    discard_body = function() end,
    get_body_data = function() return nil end,
    get_body_file = function() return nil end,
    get_post_args = function() return nil, "request body is not available to the WAF" end,
    http_version = function() return 1.1 end,
    is_internal = function() return false end,
}

local get_var = host.var

local ngx_re = {
    match = host.re_match,
    find = host.re_find,
    gmatch = host.re_gmatch,
    sub = host.re_sub,
    gsub = host.re_gsub,
}

-- Variables already read in this request, and those the host handed over up front (see
-- `run`). Request variables cannot change during a request, and a Lua table lookup is far
-- cheaper than a call into the host.
-- `ngx.var.x` finds a cached value without calling any function (`__index` is the cache
-- table itself); a miss falls through to the cache's own `__index`, which asks the host.
local rawset = rawset
local var_cache = setmetatable({}, {
    __index = function(cache, name)
        local value = get_var(name)
        if value ~= nil then
            rawset(cache, name, value)
        end
        return value
    end,
})

local var = newproxy(true)
do
    local mt = getmetatable(var)
    mt.__index = var_cache
    mt.__newindex = function(_, key)
        error("variable \"" .. tostring(key) .. "\" not changeable", 2)
    end
    mt.__metatable = false
end

local header = newproxy(true)
do
    local mt = getmetatable(header)
    mt.__index = host.header_get
    mt.__newindex = host.header_set
    mt.__metatable = false
end

-- A dictionary as scripts see it: a read-only object whose `get`, `set`, `add` and `incr`
-- call plain host functions with the dictionary's index (cheaper than the userdata's own
-- methods), and whose other methods are the userdata handle's.
local make_dict = host.dict
local dict_get, dict_set, dict_add, dict_incr = host.dict_get, host.dict_set, host.dict_add, host.dict_incr
local function new_dict(name)
    local handle, id = make_dict(name)
    if handle == nil then
        return nil
    end
    local methods = {
        get = function(_, key)
            local value, err = dict_get(id, key)
            if err ~= nil then
                return nil, err
            end
            return value
        end,
        set = function(_, key, value, exptime)
            return dict_set(id, key, value, exptime)
        end,
        add = function(_, key, value, exptime)
            return dict_add(id, key, value, exptime)
        end,
        incr = function(_, key, value, init, init_ttl)
            local new, err, forcible = dict_incr(id, key, value, init, init_ttl)
            if new == nil then
                return nil, err
            end
            return new, nil, forcible
        end,
    }
    setmetatable(methods, {
        __index = function(cache, method)
            local f = handle[method]
            if f == nil then
                return nil
            end
            local bound = function(_, ...)
                return f(handle, ...)
            end
            rawset(cache, method, bound)
            return bound
        end,
    })
    return readonly(methods, "ngx.shared." .. tostring(name))
end

-- Dictionaries already handed out; as with `ngx.var`, a hit calls no function. Each
-- domain has its own dictionaries, so each chunk has its own cache: the runner points
-- `ngx.shared` at its chunk's before the chunk runs.
local dict_cache_mt = {
    __index = function(cache, name)
        local dict = new_dict(name)
        if dict ~= nil then
            rawset(cache, name, dict)
        end
        return dict
    end,
}
local function new_dict_cache()
    return setmetatable({}, dict_cache_mt)
end
local shared = newproxy(true)
local shared_mt = getmetatable(shared)
shared_mt.__index = new_dict_cache()
shared_mt.__newindex = function() error("attempt to modify ngx.shared", 2) end
shared_mt.__metatable = false

-- Called when dictionaries were freed (the host drops every chunk at the same time): the
-- last run's cache must not keep them alive.
local function forget_dicts()
    shared_mt.__index = new_dict_cache()
end

local ngx = {
    var = var,
    header = header,
    shared = shared,
    req = readonly(ngx_req, "ngx.req"),
    re = readonly(ngx_re, "ngx.re"),
    exit = host.exit,
    redirect = host.redirect,
    say = host.say,
    print = host.print,
    flush = function() return 1 end,
    eof = function() return 1 end,
    log = host.log,
    time = host.time,
    now = host.now,
    today = host.today,
    localtime = host.localtime,
    utctime = host.utctime,
    http_time = host.http_time,
    cookie_time = host.cookie_time,
    update_time = function() end,
    md5 = host.md5,
    md5_bin = host.md5_bin,
    encode_base64 = host.encode_base64,
    decode_base64 = host.decode_base64,
    escape_uri = host.escape_uri,
    unescape_uri = host.unescape_uri,
    encode_args = host.encode_args,
    decode_args = host.decode_args,
    quote_sql_str = host.quote_sql_str,
    sleep = function() error("ngx.sleep is not available in the WAF", 2) end,
    get_phase = function() return "access" end,
    null = host.null,
    is_subrequest = false,
    headers_sent = false,
    worker = readonly({
        id = function() return 0 end,
        count = function() return 1 end,
        pid = function() return 0 end,
        exiting = function() return false end,
    }, "ngx.worker"),
    config = readonly({
        subsystem = "http",
        debug = false,
        nginx_version = 1026000,
        ngx_lua_version = 10026,
        prefix = function() return "" end,
        nginx_configure = function() return "" end,
    }, "ngx.config"),
}
for name, value in pairs(host.constants) do
    ngx[name] = value
end

-- ngx.status and ngx.ctx are per request: read through a metatable behind the static fields.
local get_status = host.status_get
setmetatable(ngx, {
    __index = function(_, key)
        if key == "status" then
            return get_status()
        elseif key == "ctx" then
            local ctx = slots.ctx
            if ctx == nil then
                ctx = {}
                slots.ctx = ctx
            end
            return ctx
        end
        return nil
    end,
})

local ngx_proxy = newproxy(true)
do
    local set_status = host.status_set
    local mt = getmetatable(ngx_proxy)
    mt.__index = ngx
    mt.__newindex = function(_, key, value)
        if key == "status" then
            set_status(value)
        elseif key == "ctx" then
            if type(value) ~= "table" then
                error("ngx.ctx must be a table", 2)
            end
            slots.ctx = value
        else
            error("attempt to modify read-only table 'ngx' (field '" .. tostring(key) .. "')", 2)
        end
    end
    mt.__metatable = false
    mt.__tostring = function() return "ngx" end
end

-- The original agent's `request` table: method, uri (with query), host, remote_addr, and
-- headers indexed case-insensitively.
local request_headers = newproxy(true)
do
    local mt = getmetatable(request_headers)
    mt.__index = host.legacy_header
    mt.__newindex = function() error("attempt to modify request.headers", 2) end
    mt.__metatable = false
end
local request = readonly(setmetatable({ headers = request_headers }, { __index = host.legacy }), "request")

local safe_os = { time = os.time, date = os.date, clock = os.clock }

local sandbox = {
    _VERSION = _VERSION,
    assert = assert,
    error = error,
    ipairs = ipairs,
    next = next,
    pairs = pairs,
    pcall = safe_pcall,
    xpcall = safe_xpcall,
    select = select,
    tonumber = tonumber,
    tostring = tostring,
    type = type,
    unpack = unpack,
    rawequal = rawequal,
    rawget = rawget,
    rawset = rawset,
    setmetatable = setmetatable,
    getmetatable = getmetatable,
    collectgarbage = function(option)
        if option == "count" then
            return collectgarbage("count")
        end
        error("collectgarbage: only \"count\" is allowed in the WAF", 2)
    end,
    print = function(...)
        return host.log(host.constants.NOTICE, ...)
    end,
    string = readonly(string, "string"),
    table = readonly(table, "table"),
    math = readonly(math, "math"),
    os = readonly(safe_os, "os"),
    bit = readonly(bit, "bit"),
    ngx = ngx_proxy,
    request = request,
}

-- Scripts index `headers["User-Agent"]` or `headers.user_agent` on get_headers() results;
-- the host sets this metatable on every table get_headers returns.
local headers_mt = host.headers_mt
headers_mt.__index = function(t, key)
    if type(key) == "string" then
        local normal = key:lower():gsub("_", "-")
        if normal ~= key then
            return rawget(t, normal)
        end
    end
    return nil
end
headers_mt.__metatable = false

-- A fresh environment for one chunk: globals land here and are cleared between requests.
-- A global the script reads is copied into its environment on first use, so later reads
-- (in this request and the following ones) find it without going through `__index`: about
-- a sixth of a short script's time went into those lookups. `run` keeps these copies and
-- drops everything else, so what the environment holds between requests is always exactly
-- what `sandbox` would give.
local env_mt = {
    __index = function(env, key)
        local value = sandbox[key]
        if value ~= nil then
            rawset(env, key, value)
        end
        return value
    end,
    __metatable = false,
}
local function new_env()
    return setmetatable({}, env_mt)
end

-- The function that runs one chunk for one request, made once per chunk: it empties the
-- chunk's environment (globals of the previous request must not leak) and the per-request
-- slots, stores the variables the host read up front, then calls the chunk. One call from
-- the host does it all.
-- `names` lists the variables the script mentions (at most ten); their values are the
-- runner's arguments, read by the host in the same call, which is cheaper than one host
-- call per variable.
local next = next
local function make_runner(env, chunk, names)
    local n1, n2, n3, n4, n5 = names[1], names[2], names[3], names[4], names[5]
    local n6, n7, n8, n9, n10 = names[6], names[7], names[8], names[9], names[10]
    local dicts = new_dict_cache()
    return function(v1, v2, v3, v4, v5, v6, v7, v8, v9, v10)
        shared_mt.__index = dicts
        -- Whatever the previous request set (a new global, a sandbox name reassigned, even
        -- with rawset or table.insert on _G) differs from `sandbox`'s value and goes; copies
        -- made by `env_mt.__index` stay. Clearing fields while traversing is allowed in
        -- Lua. `sandbox` has no metatable, and none of its values has an `__eq` a script
        -- could reach, so the comparison is raw.
        for key, value in next, env do
            if sandbox[key] ~= value then
                env[key] = nil
            end
        end
        env._G = env
        slots.ctx = nil
        for key in next, var_cache do
            var_cache[key] = nil
        end
        -- A name's value is nil when the request lacks it (no such header, no query).
        if v1 ~= nil then var_cache[n1] = v1 end
        if v2 ~= nil then var_cache[n2] = v2 end
        if v3 ~= nil then var_cache[n3] = v3 end
        if v4 ~= nil then var_cache[n4] = v4 end
        if v5 ~= nil then var_cache[n5] = v5 end
        if v6 ~= nil then var_cache[n6] = v6 end
        if v7 ~= nil then var_cache[n7] = v7 end
        if v8 ~= nil then var_cache[n8] = v8 end
        if v9 ~= nil then var_cache[n9] = v9 end
        if v10 ~= nil then var_cache[n10] = v10 end
        return chunk()
    end
end

return new_env, make_runner, forget_dicts

//! WAF attacks: hostile `luaCode` written into the config file the agent reloads, then
//! requests that run it. Memory and CPU bombs, recursion (through Lua and through C
//! callbacks), sandbox escapes, shared-dictionary flooding and cross-tenant reads, header
//! injection and framing headers from scripts, and log floods.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::thread;
use std::time::{Duration, Instant};

use super::harness::{Setup, TENANT_HOST, VICTIM_HOST};
use super::net::{self, attack_source};
use super::{Attack, Check, Ctx, Limits};

pub(crate) fn attacks() -> Vec<Attack> {
    vec![
        Attack {
            name: "waf-memory-bombs",
            fast: true,
            setup: Setup::File,
            expected: "string doubling, table growth, string.rep of 1 GB, a 100 MB table.concat and 10 MB of ngx.say are aborted at the 64 MiB per-state cap (or the output cap, 1 MiB): the request fails open to the origin, the state keeps serving, memory comes back",
            peers: "OpenResty: lua_max_pending_timers etc., but no per-request memory cap (a script can take the worker's memory; LuaJIT's 2 GB GC limit); nginx njs: js_max_memory (no default)",
            limits: Limits {
                rss_growth_mib: 160,
                ..Limits::DEFAULT
            },
            run: memory_bombs,
        },
        Attack {
            name: "waf-cpu-bombs",
            fast: true,
            setup: Setup::File,
            expected: "endless loops, backtracking Lua patterns on a 400-byte User-Agent (issue 17 finding 3), quadratic gmatch/gsub, a regex compile bomb, 5,000 distinct regexes, a regex search whose worst case is 30,000 NFA states on 100 KB (seconds of the regex crate, which no budget interrupts: refused with nil, err), and loops whose time goes into library calls (string.upper and string.rep on 1 MB, 1.6 and 1.5 s of work) are stopped by the run budget (10M instructions, 50 ms) within about 100 ms: fail open, no worker frozen",
            peers: "OpenResty: none: a loop or a catastrophic pattern freezes the nginx worker (lua_code_cache on, no instruction limit); PCRE's match limit (pcre_match_limit) bounds ngx.re only",
            limits: Limits::DEFAULT,
            run: cpu_bombs,
        },
        Attack {
            name: "waf-recursion",
            fast: true,
            setup: Setup::File,
            expected: "Lua recursion is a Lua error; recursion through string.gsub, ngx.re.gsub, table.sort and __tostring callbacks (issue 17 finding 1, which killed the agent with SIGSEGV) is a Lua error past 1 MiB of C stack; a 600-deep (((...))) unwrapped by a gsub rule fails open",
            peers: "OpenResty: LuaJIT's C stack limit (LUAI_MAXCCALLS 200) raises \"C stack overflow\"; nginx worker stacks are the thread's 8 MB",
            limits: Limits::DEFAULT,
            run: recursion,
        },
        Attack {
            name: "waf-sandbox-escape",
            fast: true,
            setup: Setup::File,
            expected: "io, os.execute/getenv/remove/exit, load/loadstring/dofile/loadfile/require/package, debug, string.dump, getfenv/setfenv, collectgarbage(\"stop\"), newproxy, coroutine, jit, ffi, writes to string/ngx, replacing ngx.exit, ngx.sleep and sockets all fail; a global set by one request is gone in the next",
            peers: "OpenResty has no sandbox: access_by_lua code has io, os and ffi (the operator writes it); the agent runs customers' code, so it must",
            limits: Limits::DEFAULT,
            run: sandbox_escape,
        },
        Attack {
            name: "waf-shared-dict-flood",
            fast: true,
            setup: Setup::File,
            expected: "one domain writing 1 KB values under fresh keys into 40 dictionary names gets 16 dictionaries and 16 MiB in all (the least recently used evicted), another domain neither sees its keys nor loses its own dictionary (issue 17 finding 6); a NaN, negative or infinite TTL is refused",
            peers: "OpenResty: lua_shared_dict NAME SIZE declares each dictionary and its size in nginx.conf, shared by every server block (no per-tenant isolation); set with a bad exptime errors",
            limits: Limits {
                rss_growth_mib: 64,
                ..Limits::DEFAULT
            },
            run: shared_dict_flood,
        },
        Attack {
            name: "waf-header-injection",
            fast: true,
            setup: Setup::File,
            expected: "CR/LF in a script's header names, values or redirect target never reach the wire (no injected field); Content-Length, Transfer-Encoding and Connection set by a script are overridden or dropped so the next response on the connection (HTTP/1.1) and the stream (HTTP/2) stay intact (issue 17 finding 8); a status of 1000 is refused",
            peers: "OpenResty escapes CR, LF and NUL in ngx.header names and values (lua-nginx-module, 2020); nginx frames the response by its own Content-Length / Transfer-Encoding",
            limits: Limits::DEFAULT,
            run: header_injection,
        },
        Attack {
            name: "waf-bypass-target",
            fast: true,
            setup: Setup::File,
            expected: "a rule blocking /admin also holds for /admin#x, ftp://host/admin and /admin%00 (400: issue 17 finding 7), and for /%61dmin, //admin, /x/../admin, /./admin and http://host/admin (the WAF sees the path the origin gets); no request line naming admin reaches the origin",
            peers: "nginx: 400 for # and NUL in the target and for non-http schemes, $uri is the decoded, merged, dot-segment-free path (merge_slashes on), so the rule holds",
            limits: Limits::DEFAULT,
            run: bypass_target,
        },
        Attack {
            name: "waf-log-flood",
            fast: true,
            setup: Setup::File,
            expected: "scripts logging 1 MiB per request with ngx.log and print write at most about 64 KiB of messages a second in all (issue 17 finding 10): messages are cut at 2,000 bytes and lines dropped and counted past 100 a second",
            peers: "nginx: error_log lines are cut at 2,048 bytes (NGX_MAX_ERROR_STR) but not rate limited",
            limits: Limits::DEFAULT,
            run: log_flood,
        },
    ]
}

/// One request to a scripted host, and what came back.
struct Shot {
    status: u16,
    ms: f64,
    body: String,
}

fn get(
    server: SocketAddr,
    host: &str,
    path: &str,
    headers: &str,
    source: Ipv4Addr,
) -> Result<Shot, String> {
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}Connection: close\r\n\r\n");
    let started = Instant::now();
    let response = net::http_once(source, server, request.as_bytes(), Duration::from_secs(10))
        .map_err(|error| error.to_string())?;
    Ok(Shot {
        status: response.status,
        ms: started.elapsed().as_secs_f64() * 1000.0,
        body: String::from_utf8_lossy(&response.body).into_owned(),
    })
}

/// Sends `repeats` rounds of every `(path, headers)` to the victim, one request at a time
/// (so a request's time is its own script's, not a wait behind another), and returns, per
/// path, the outcomes (`fail-open 200` when the script failed open) and the slowest.
fn barrage(
    ctx: &Ctx<'_>,
    cases: &[(&str, String)],
    repeats: usize,
) -> BTreeMap<String, (BTreeMap<String, usize>, f64)> {
    let server = ctx.agent().http;
    let mut by_path: BTreeMap<String, (BTreeMap<String, usize>, f64)> = BTreeMap::new();
    for round in 0..repeats {
        for (path, headers) in cases {
            let shot = get(
                server,
                VICTIM_HOST,
                path,
                headers,
                attack_source(2500 + round),
            );
            let key = path.split('?').next().unwrap_or("").to_owned();
            let entry = by_path.entry(key).or_default();
            let outcome = match &shot {
                Ok(shot) if shot.status == 200 && shot.body.starts_with("origin ok") => {
                    "fail-open 200".to_owned()
                }
                Ok(shot) => format!("{} {:.40}", shot.status, shot.body.trim()),
                Err(error) => format!("error {error}"),
            };
            *entry.0.entry(outcome).or_default() += 1;
            if let Ok(shot) = shot {
                entry.1 = entry.1.max(shot.ms);
            }
        }
    }
    by_path
}

/// `/path: outcomes, slowest N ms` for each path; and whether every request failed open
/// within `max_ms`.
fn judge(
    results: &BTreeMap<String, (BTreeMap<String, usize>, f64)>,
    max_ms: f64,
) -> (bool, String) {
    let mut ok = true;
    let mut lines = Vec::new();
    for (path, (outcomes, slowest)) in results {
        let all_open = outcomes.keys().all(|outcome| outcome == "fail-open 200");
        ok &= all_open && *slowest <= max_ms;
        let outcomes: Vec<String> = outcomes.iter().map(|(o, n)| format!("{o} ×{n}")).collect();
        lines.push(format!(
            "{path}: {} (slowest {slowest:.0} ms)",
            outcomes.join(", ")
        ));
    }
    (ok, lines.join("; "))
}

/// Runs `script` on the victim for `cases`, then removes it.
fn scripted(
    ctx: &mut Ctx<'_>,
    script: &str,
    cases: &[(&str, String)],
    max_ms: f64,
) -> anyhow::Result<Check> {
    ctx.lab.set_scripts(Some(script), None)?;
    let stats_before = waf_counts(ctx);
    let repeats = ctx.scale(3, 20);
    let results = barrage(ctx, cases, repeats);
    let stats_after = waf_counts(ctx);
    ctx.lab.set_scripts(None, None)?;
    let (ok, text) = judge(&results, max_ms);
    Ok(Check::new(
        ok,
        format!(
            "{text}; waf errors +{:.0}, aborts +{:.0}",
            stats_after.0 - stats_before.0,
            stats_after.1 - stats_before.1
        ),
    ))
}

fn waf_counts(ctx: &Ctx<'_>) -> (f64, f64) {
    let agent = ctx.agent();
    (
        agent.stat("waf", "errors_total"),
        agent.stat("waf", "aborts_total"),
    )
}

fn memory_bombs(ctx: &mut Ctx<'_>) -> anyhow::Result<Check> {
    let script = r#"
local uri = ngx.var.uri
if uri == '/string' then
  local s = 'x'
  while true do s = s .. s end
elseif uri == '/table' then
  local t, i = {}, 0
  while true do i = i + 1; t[i] = {i, i, i} end
elseif uri == '/rep' then
  local s = string.rep('x', 1e9)
  return ngx.exit(418)
elseif uri == '/concat' then
  local t = {}
  for i = 1, 1e7 do t[i] = 'xxxxxxxxxx' end
  local s = table.concat(t)
  return ngx.exit(418)
elseif uri == '/say' then
  for i = 1, 100 do ngx.say(string.rep('y', 100000)) end
  return ngx.exit(200)
end
"#;
    let cases: Vec<(&str, String)> = ["/string", "/table", "/rep", "/concat", "/say"]
        .into_iter()
        .map(|path| (path, String::new()))
        .collect();
    scripted(ctx, script, &cases, 2000.0)
}

fn cpu_bombs(ctx: &mut Ctx<'_>) -> anyhow::Result<Check> {
    let script = r#"
local uri = ngx.var.uri
if uri == '/loop' then
  while true do end
elseif uri == '/numeric' then
  local x = 0
  for i = 1, 1e12 do x = x + i end
elseif uri == '/pattern' then
  local ua = ngx.var.http_user_agent or ''
  if ua:find('^(.-)%s*(.-)%s*(.-)%s*(.-)%s*bot$') then return ngx.exit(403) end
elseif uri == '/gmatch' then
  local s = string.rep('a', 200000)
  for w in s:gmatch('a-b') do end
elseif uri == '/gsub' then
  local s = string.rep('a', 100000)
  s = s:gsub('a-b', 'x')
elseif uri == '/regex' then
  ngx.re.match(string.rep('a', 20000) .. 'b', '^(a+)+$')
  return ngx.exit(ngx.OK)
elseif uri == '/regex-compile' then
  local m, err = ngx.re.match('x', '((((a{100}){100}){100}){100})')
  if not err then return ngx.exit(418) end
elseif uri == '/regex-churn' then
  for i = 1, 5000 do ngx.re.match('x', 'a' .. i .. 'b+') end
elseif uri == '/regex-search' then
  local m = ngx.re.match(string.rep('a', 100000), string.rep('a', 30000))
  if m then return ngx.exit(418) end
elseif uri == '/upper-loop' then
  local s = string.rep('x', 1000000)
  for i = 1, 1000 do local u = s:upper() end
elseif uri == '/rep-loop' then
  for i = 1, 500 do local u = string.rep('ab', 500000) end
end
"#;
    let user_agent = format!("User-Agent: {}x\r\n", "a ".repeat(200));
    let cases: Vec<(&str, String)> = vec![
        ("/loop", String::new()),
        ("/numeric", String::new()),
        ("/pattern", user_agent),
        ("/gmatch", String::new()),
        ("/gsub", String::new()),
        ("/regex", String::new()),
        ("/regex-compile", String::new()),
        ("/regex-churn", String::new()),
        ("/regex-search", String::new()),
        ("/upper-loop", String::new()),
        ("/rep-loop", String::new()),
    ];
    // The budget is 50 ms; a debug build and a busy machine get room on top.
    scripted(ctx, script, &cases, 1000.0)
}

fn recursion(ctx: &mut Ctx<'_>) -> anyhow::Result<Check> {
    let script = r#"
local uri = ngx.var.uri
if uri == '/lua' then
  local function f(n) return f(n + 1) + 1 end
  f(1)
elseif uri == '/gsub' then
  local function f(s) return (s:gsub('.', f)) end
  pcall(f, 'abc')
elseif uri == '/unwrap' then
  local function unwrap(s)
    return (s:gsub('%b()', function(inner) return unwrap(inner:sub(2, -2)) end))
  end
  unwrap(ngx.var.arg_q or '')
elseif uri == '/re-gsub' then
  local function f(s) return (ngx.re.gsub(s, '.', function(m) return f(m[0] .. m[0]) end)) end
  pcall(f, 'ab')
elseif uri == '/sort' then
  local function cmp(a, b) table.sort({3, 2, 1}, cmp); return a < b end
  pcall(table.sort, {5, 4, 3, 2, 1}, cmp)
elseif uri == '/tostring' then
  local mt = {}
  mt.__tostring = function(v) return string.format('%s', v) end
  pcall(string.format, '%s', setmetatable({}, mt))
end
"#;
    let nested = format!("{}{}", "(".repeat(600), ")".repeat(600));
    let unwrap_path = format!("/unwrap?q={nested}");
    let cases: Vec<(&str, String)> = vec![
        ("/lua", String::new()),
        ("/gsub", String::new()),
        (unwrap_path.as_str(), String::new()),
        ("/re-gsub", String::new()),
        ("/sort", String::new()),
        ("/tostring", String::new()),
    ];
    scripted(ctx, script, &cases, 1000.0)
}

fn sandbox_escape(ctx: &mut Ctx<'_>) -> anyhow::Result<Check> {
    let script = r#"
local found = {}
local function try(name, f)
  local ok, result = pcall(f)
  if ok and result ~= nil and result ~= false then found[#found + 1] = name end
end
try('io.open', function() return io.open('/etc/hostname') end)
try('io.popen', function() return io.popen('true') end)
try('os.execute', function() return os.execute('true') end)
try('os.getenv', function() return os.getenv('PATH') end)
try('os.remove', function() return os.remove('/nonexistent-hostile-probe') ~= nil end)
try('os.tmpname', function() return os.tmpname() end)
try('load', function() return load('return 1')() end)
try('loadstring', function() return loadstring('return 1')() end)
try('bytecode', function() return load(string.char(27, 76, 74, 2)) end)
try('dofile', function() dofile('/etc/hostname'); return true end)
try('loadfile', function() return loadfile('/etc/hostname') end)
try('require', function() return require('ffi') end)
try('package', function() return package.loaded end)
try('module', function() return module('hostile') end)
try('debug', function() return debug.getregistry() end)
try('string.dump', function() return string.dump(function() end) end)
try('getfenv', function() return getfenv(0) end)
try('setfenv', function() return setfenv(1, {}) end)
try('collectgarbage', function() collectgarbage('stop'); return true end)
try('gcinfo', function() return gcinfo() end)
try('newproxy', function() return newproxy(true) end)
try('coroutine', function() return coroutine.create(function() end) end)
try('jit', function() return jit.status() end)
try('ffi', function() return ffi.C end)
try('string metatable', function() local mt = getmetatable(''); return mt and mt.__index end)
try('write string', function() string.upper = function() return 'pwned' end; return string.upper('x') == 'pwned' end)
try('rawset string', function() rawset(string, 'pwn', 1); return string.pwn == 1 end)
try('setmetatable string', function() setmetatable(string, {}); return true end)
try('table.insert ngx', function() table.insert(ngx, 1); return true end)
try('replace ngx.exit', function() ngx.exit = function() end; return true end)
try('ngx.var write', function() ngx.var.remote_addr = '192.0.2.1'; return ngx.var.remote_addr == '192.0.2.1' end)
try('ngx.sleep', function() ngx.sleep(0.001); return true end)
try('ngx.socket', function() return ngx.socket.tcp() end)
try('ngx.location', function() return ngx.location.capture('/') end)
try('global survived', function() return survived_from_last_request end)
try('os.exit', function() os.exit(3) end)
survived_from_last_request = true
ngx.say('escaped:', table.concat(found, ','))
return ngx.exit(200)
"#;
    ctx.lab.set_scripts(Some(script), None)?;
    let server = ctx.agent().http;
    let mut bodies = BTreeMap::new();
    for n in 0..ctx.scale(4, 20) {
        let outcome = match get(server, VICTIM_HOST, "/escape", "", attack_source(2700 + n)) {
            Ok(shot) => format!("{} {}", shot.status, shot.body.trim()),
            Err(error) => format!("error {error}"),
        };
        *bodies.entry(outcome).or_insert(0) += 1;
    }
    ctx.lab.set_scripts(None, None)?;
    let ok = bodies.keys().all(|body| body == "200 escaped:");
    let text: Vec<String> = bodies
        .iter()
        .map(|(body, n)| format!("{body:?} ×{n}"))
        .collect();
    Ok(Check::new(
        ok,
        format!("36 escapes tried per request: {}", text.join(", ")),
    ))
}

fn shared_dict_flood(ctx: &mut Ctx<'_>) -> anyhow::Result<Check> {
    let victim = r#"
local uri = ngx.var.uri
if uri == '/probe' then
  ngx.shared.limits:set('probe', 'victim-secret')
  ngx.say('set')
  return ngx.exit(200)
elseif uri == '/flood' then
  local n = 0
  for d = 1, 40 do
    local dict = ngx.shared['flood' .. d]
    if dict then
      n = n + 1
      local base = tostring(math.random()) .. ngx.now()
      for i = 1, 50 do dict:set(base .. i, string.rep('v', 1024)) end
    end
  end
  ngx.say('dicts=', n)
  return ngx.exit(200)
elseif uri == '/report' then
  local n, keys, free = 0, 0, 0
  for d = 1, 40 do
    local dict = ngx.shared['flood' .. d]
    if dict then n = n + 1; keys = keys + #dict:get_keys(0); free = dict:free_space() end
  end
  ngx.say('dicts=', n + 1, ' keys=', keys, ' capacity=', ngx.shared.flood1:capacity(), ' free=', free)
  return ngx.exit(200)
elseif uri == '/ttl' then
  local d, accepted = ngx.shared.limits, {}
  for _, ttl in ipairs({0/0, -1, math.huge}) do
    if pcall(d.set, d, 'ttl', 1, ttl) then accepted[#accepted + 1] = tostring(ttl) end
  end
  ngx.say('accepted ttl:', table.concat(accepted, ','))
  return ngx.exit(200)
end
"#;
    let tenant = r#"
local mine = ngx.shared.mine
if mine then mine:set('k', 'v') end
ngx.say('probe=', tostring(ngx.shared.limits and ngx.shared.limits:get('probe')),
  ' mine=', tostring(mine and mine:get('k')))
return ngx.exit(200)
"#;
    ctx.lab.set_scripts(Some(victim), Some(tenant))?;
    let server = ctx.agent().http;
    let source = attack_source(2800);
    let body = |host: &str, path: &str| {
        get(server, host, path, "", source).map_or_else(
            |error| format!("error {error}"),
            |shot| format!("{} {}", shot.status, shot.body.trim()),
        )
    };
    let probe = body(VICTIM_HOST, "/probe");
    let evictions_before = ctx.agent().stat("waf", "dict_evictions_total");
    let rss_before = ctx.agent().usage().rss_kib;
    let requests = ctx.scale(40, 200);
    let mut flood_outcomes: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..requests {
        *flood_outcomes
            .entry(body(VICTIM_HOST, "/flood"))
            .or_default() += 1;
    }
    let rss_after = ctx.agent().usage().rss_kib;
    let report = body(VICTIM_HOST, "/report");
    let ttl = body(VICTIM_HOST, "/ttl");
    let tenant_view = body(TENANT_HOST, "/");
    let evictions = ctx.agent().stat("waf", "dict_evictions_total") - evictions_before;
    ctx.lab.set_scripts(None, None)?;
    let ok = probe == "200 set"
        && report.starts_with("200 dicts=16 ")
        && ttl == "200 accepted ttl:"
        && tenant_view == "200 probe=nil mine=v";
    Ok(Check::new(
        ok,
        format!(
            "{requests} floods of ~1 MB: {flood_outcomes:?}; report {report:?}; {evictions:.0} evictions; \
             RSS +{} MiB while flooding; bad TTLs: {ttl:?}; the other domain sees {tenant_view:?}",
            rss_after.saturating_sub(rss_before) / 1024
        ),
    ))
}

fn header_injection(ctx: &mut Ctx<'_>) -> anyhow::Result<Check> {
    let script = r#"
local uri = ngx.var.uri
if uri == '/crlf-value' then ngx.header['X-Evil'] = 'a\r\nSet-Cookie: injected=1'
elseif uri == '/crlf-name' then ngx.header['X-Evil\r\nSet-Cookie: injected=2'] = 'x'
elseif uri == '/lf-value' then ngx.header['X-Evil'] = 'a\nSet-Cookie: injected=3'
elseif uri == '/redirect' then return ngx.redirect('/x\r\nSet-Cookie: injected=4')
elseif uri == '/content-length' then ngx.header['Content-Length'] = '0'
elseif uri == '/transfer-encoding' then ngx.header['Transfer-Encoding'] = 'chunked'
elseif uri == '/connection' then ngx.header['Connection'] = 'close, x-hop'
elseif uri == '/status' then ngx.status = 1000; ngx.say('x'); return ngx.exit(ngx.OK)
elseif uri == '/local-length' then ngx.header['Content-Length'] = '100'; ngx.say('short'); return ngx.exit(200)
end
"#;
    ctx.lab.set_scripts(Some(script), None)?;
    let server = ctx.agent().http;
    let paths = [
        "/crlf-value",
        "/crlf-name",
        "/lf-value",
        "/redirect",
        "/content-length",
        "/transfer-encoding",
        "/connection",
        "/status",
        "/local-length",
    ];
    let mut results = Vec::new();
    let mut ok = true;
    for (n, path) in paths.iter().enumerate() {
        // Two requests on one keep-alive connection: the second shows whether the first
        // response's framing was intact.
        let outcome = (|| -> std::io::Result<String> {
            let mut stream =
                net::connect_from(attack_source(2900 + n), server, Duration::from_secs(5))?;
            stream.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: {VICTIM_HOST}\r\n\r\nGET /second HTTP/1.1\r\nHost: {VICTIM_HOST}\r\n\r\n")
                    .as_bytes(),
            )?;
            let mut buffered = Vec::new();
            let first = net::read_response(&mut stream, &mut buffered, false)?;
            let injected = first.head.to_ascii_lowercase().contains("\nset-cookie: injected");
            let second = net::read_response(&mut stream, &mut buffered, false);
            let second_ok = second
                .as_ref()
                .is_ok_and(|r| r.status == 200 && r.body == b"origin ok /second");
            let closed_cleanly = second.is_err() && first.header("connection") == Some("close");
            Ok(format!(
                "{} {}{}",
                first.status,
                if injected { "INJECTED " } else { "" },
                if second_ok {
                    "next ok"
                } else if closed_cleanly {
                    "then close"
                } else {
                    "NEXT BROKEN"
                }
            ))
        })()
        .unwrap_or_else(|error| format!("error {error}"));
        ok &= !outcome.contains("INJECTED")
            && !outcome.contains("BROKEN")
            && !outcome.starts_with("error")
            && !outcome.starts_with("1000");
        results.push(format!("{path}: {outcome}"));
    }
    // The framing headers over HTTP/2: the stream must end with a response, not a reset.
    let h2_outcomes = super::h2::probe_paths(
        ctx.agent().http,
        VICTIM_HOST,
        &["/content-length", "/transfer-encoding", "/connection"],
    );
    for (path, outcome) in h2_outcomes {
        ok &= outcome.starts_with("200");
        results.push(format!("h2 {path}: {outcome}"));
    }
    ctx.lab.set_scripts(None, None)?;
    Ok(Check::new(ok, results.join("; ")))
}

fn bypass_target(ctx: &mut Ctx<'_>) -> anyhow::Result<Check> {
    let script = "if ngx.var.uri == '/admin' then return ngx.exit(403) end";
    ctx.lab.set_scripts(Some(script), None)?;
    let server = ctx.agent().http;
    let targets: [(&str, &[u16]); 9] = [
        ("/admin", &[403]),
        ("/admin#x", &[400, 403]),
        ("ftp://victim.test/admin", &[400, 403]),
        ("/admin%00", &[400, 403]),
        ("/%61dmin", &[400, 403]),
        ("//admin", &[400, 403]),
        ("/x/../admin", &[400, 403]),
        ("/./admin", &[400, 403]),
        ("http://victim.test/admin", &[403]),
    ];
    let mut results = Vec::new();
    let mut ok = true;
    let origin_saw_before = ctx.lab.origin.log.saw("admin");
    for (n, (target, expected)) in targets.iter().enumerate() {
        let request =
            format!("GET {target} HTTP/1.1\r\nHost: {VICTIM_HOST}\r\nConnection: close\r\n\r\n");
        let status = net::http_once(
            attack_source(3100 + n),
            server,
            request.as_bytes(),
            Duration::from_secs(5),
        )
        .map_or(0, |response| response.status);
        let good = expected.contains(&status);
        ok &= good;
        results.push(format!(
            "{target} {status}{}",
            if good { "" } else { " (BYPASS)" }
        ));
    }
    thread::sleep(Duration::from_millis(200));
    let reached = !origin_saw_before && ctx.lab.origin.log.saw("admin");
    ctx.lab.set_scripts(None, None)?;
    Ok(Check::new(
        ok && !reached,
        format!(
            "{}; {}",
            results.join(", "),
            if reached {
                "a request line naming admin REACHED the origin"
            } else {
                "nothing naming admin reached the origin"
            }
        ),
    ))
}

fn log_flood(ctx: &mut Ctx<'_>) -> anyhow::Result<Check> {
    let script = r#"
ngx.log(ngx.ERR, string.rep('x', 1024 * 1024))
print(string.rep('y', 100000))
"#;
    ctx.lab.set_scripts(Some(script), None)?;
    let server = ctx.agent().http;
    let log = ctx.agent().log.clone();
    let duration = Duration::from_secs(if ctx.fast { 2 } else { 10 });
    let bytes_before = log.bytes.load(Relaxed);
    let lines_before = log.lines.load(Relaxed);
    let started = Instant::now();
    let handles: Vec<_> = (0..2)
        .map(|thread_index| {
            thread::spawn(move || {
                let mut n = 0;
                while started.elapsed() < duration {
                    let _ = get(
                        server,
                        VICTIM_HOST,
                        "/log",
                        "",
                        attack_source(3000 + thread_index),
                    );
                    n += 1;
                }
                n
            })
        })
        .collect();
    let requests: usize = handles.into_iter().map(|h| h.join().unwrap_or(0)).sum();
    // Lines already written may still be on their way through the pipe.
    thread::sleep(Duration::from_millis(300));
    let seconds = started.elapsed().as_secs_f64();
    let bytes = log.bytes.load(Relaxed) - bytes_before;
    let lines = log.lines.load(Relaxed) - lines_before;
    ctx.lab.set_scripts(None, None)?;
    let per_second = bytes as f64 / seconds;
    Ok(Check::new(
        per_second <= 160.0 * 1024.0,
        format!(
            "{requests} requests asking to log {} MiB: {lines} lines, {} KiB written ({:.0} KiB/s)",
            requests * 11 / 10,
            bytes / 1024,
            per_second / 1024.0
        ),
    ))
}

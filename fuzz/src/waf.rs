//! WAF target (`waf_ngx`): random calls of the `ngx` API with random arguments, run as a
//! domain's script in the real sandbox through `WafEngine::check`, followed by another
//! domain's script that checks nothing leaked.
//!
//! The input is a small text language, so seeds read as call sequences and any bytes still
//! mean something. Each line is one call, `NAME ARG ARG ...`; an unknown name picks a call
//! by its hash. Lines starting with `#` describe the request (`#target /a?b=1`, `#header
//! Name value`, `#method POST`, `#host h`, `#addr 192.0.2.7`). Arguments are `"strings"`
//! (with `\n`, `\r`, `\0`, `\"`, `\\` and `\xNN`), numbers (`nan`, `inf`, `-0`, `huge`),
//! `nil`, `true`, `false`, `null` (`ngx.null`), `$N` (the first result of call N), tables
//! `{ a b k=v }`, and `@names` for functions, API objects, big (4 and 64 KiB) or binary strings and
//! tables with hostile metatables (see `special`); any other word is a string.
//!
//! Every call runs in `pcall`, so one failing call does not end the script; `ngx.exit` does,
//! as in OpenResty. The `string` pattern functions are among the calls (the agent's own,
//! charged to the run's budget since issue 17's finding 3); the calls never recurse
//! through C functions on purpose (finding 1, a Lua error since, has its own tests).
//!
//! Checks: the engine answers with a well-formed verdict (a status the proxy can send),
//! and the sentinel script that runs next on the same thread, for another domain, still
//! sees its own request, an empty `ngx.ctx`, no leftover globals or response headers, and
//! working `string`, `math`, `ngx.re` and `pcall`.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use defenra_config::{Reload, Snapshot};
use defenra_waf::{Clock, RequestHeaders, RequestInfo, Verdict, WafEngine, WafOptions};
use http::Method;

/// Most calls in one script; more lines are ignored.
const MAX_CALLS: usize = 16;
/// Most arguments of one call and elements of one table.
const MAX_ARGS: usize = 8;
const MAX_TABLE_DEPTH: usize = 3;

/// The calls: a name and a Lua function body over `...` (the arguments).
const CALLS: &[(&str, &str)] = &[
    ("re.match", "return ngx.re.match(...)"),
    ("re.find", "return ngx.re.find(...)"),
    (
        "re.gmatch",
        "local it, err = ngx.re.gmatch(...) if not it then return nil, err end \
         return it(), it(), it()",
    ),
    ("re.sub", "return ngx.re.sub(...)"),
    ("re.gsub", "return ngx.re.gsub(...)"),
    ("string.find", "return string.find(...)"),
    ("string.match", "return string.match(...)"),
    ("string.gsub", "return string.gsub(...)"),
    (
        "string.gmatch",
        "local it = string.gmatch(...) return it(), it(), it()",
    ),
    ("say", "return ngx.say(...)"),
    ("print", "return ngx.print(...)"),
    ("log", "return ngx.log(...)"),
    ("exit", "return ngx.exit(...)"),
    ("redirect", "return ngx.redirect(...)"),
    ("md5", "return ngx.md5(...)"),
    ("md5_bin", "return ngx.md5_bin(...)"),
    ("encode_base64", "return ngx.encode_base64(...)"),
    ("decode_base64", "return ngx.decode_base64(...)"),
    ("escape_uri", "return ngx.escape_uri(...)"),
    ("unescape_uri", "return ngx.unescape_uri(...)"),
    ("encode_args", "return ngx.encode_args(...)"),
    ("decode_args", "return ngx.decode_args(...)"),
    ("quote_sql_str", "return ngx.quote_sql_str(...)"),
    ("http_time", "return ngx.http_time(...)"),
    ("cookie_time", "return ngx.cookie_time(...)"),
    ("time", "return ngx.time(...)"),
    ("now", "return ngx.now(...)"),
    ("today", "return ngx.today(...)"),
    ("localtime", "return ngx.localtime(...)"),
    ("utctime", "return ngx.utctime(...)"),
    ("update_time", "return ngx.update_time(...)"),
    ("flush", "return ngx.flush(...)"),
    ("eof", "return ngx.eof(...)"),
    ("sleep", "return ngx.sleep(...)"),
    ("get_phase", "return ngx.get_phase(...)"),
    ("req.get_headers", "return ngx.req.get_headers(...)"),
    (
        "req.header",
        "local h = ngx.req.get_headers() local out = {} \
         for i = 1, select('#', ...) do out[i] = h[(select(i, ...))] end return out",
    ),
    ("req.get_method", "return ngx.req.get_method(...)"),
    ("req.get_uri_args", "return ngx.req.get_uri_args(...)"),
    ("req.start_time", "return ngx.req.start_time(...)"),
    ("req.read_body", "return ngx.req.read_body(...)"),
    ("req.get_body_data", "return ngx.req.get_body_data(...)"),
    ("req.get_post_args", "return ngx.req.get_post_args(...)"),
    ("req.http_version", "return ngx.req.http_version(...)"),
    ("req.set_header", "return ngx.req.set_header(...)"),
    ("var", "return ngx.var[(...)]"),
    ("var.set", "local k, v = ... ngx.var[k] = v"),
    ("header", "return ngx.header[(...)]"),
    ("header.set", "local k, v = ... ngx.header[k] = v"),
    ("status", "return ngx.status"),
    ("status.set", "ngx.status = (...)"),
    ("ctx", "return ngx.ctx[(...)]"),
    ("ctx.set", "local k, v = ... ngx.ctx[k] = v return ngx.ctx"),
    ("ctx.replace", "ngx.ctx = (...)"),
    ("shared", "return ngx.shared[D((...))]"),
    ("shared.set", "ngx.shared[D((...))] = select(2, ...)"),
    (
        "dict.get",
        "return ngx.shared[D((...))]:get(select(2, ...))",
    ),
    (
        "dict.get_stale",
        "return ngx.shared[D((...))]:get_stale(select(2, ...))",
    ),
    (
        "dict.set",
        "return ngx.shared[D((...))]:set(select(2, ...))",
    ),
    (
        "dict.safe_set",
        "return ngx.shared[D((...))]:safe_set(select(2, ...))",
    ),
    (
        "dict.add",
        "return ngx.shared[D((...))]:add(select(2, ...))",
    ),
    (
        "dict.safe_add",
        "return ngx.shared[D((...))]:safe_add(select(2, ...))",
    ),
    (
        "dict.replace",
        "return ngx.shared[D((...))]:replace(select(2, ...))",
    ),
    (
        "dict.incr",
        "return ngx.shared[D((...))]:incr(select(2, ...))",
    ),
    (
        "dict.delete",
        "return ngx.shared[D((...))]:delete(select(2, ...))",
    ),
    (
        "dict.ttl",
        "return ngx.shared[D((...))]:ttl(select(2, ...))",
    ),
    (
        "dict.expire",
        "return ngx.shared[D((...))]:expire(select(2, ...))",
    ),
    (
        "dict.flush_all",
        "return ngx.shared[D((...))]:flush_all(select(2, ...))",
    ),
    (
        "dict.flush_expired",
        "return ngx.shared[D((...))]:flush_expired(select(2, ...))",
    ),
    (
        "dict.get_keys",
        "return ngx.shared[D((...))]:get_keys(select(2, ...))",
    ),
    (
        "dict.capacity",
        "return ngx.shared[D((...))]:capacity(select(2, ...))",
    ),
    (
        "dict.free_space",
        "return ngx.shared[D((...))]:free_space(select(2, ...))",
    ),
    (
        "dict.lpush",
        "return ngx.shared[D((...))]:lpush(select(2, ...))",
    ),
    (
        "dict.method",
        "local d = ngx.shared[D((...))] return d[select(2, ...)]",
    ),
    (
        "dict.dot",
        "local d = ngx.shared[D((...))] return d.set(select(2, ...))",
    ),
    ("request", "return request[(...)]"),
    ("request.headers", "return request.headers[(...)]"),
    ("request.set", "local k, v = ... request[k] = v"),
    ("ngx", "return ngx[(...)]"),
    ("ngx.set", "local k, v = ... ngx[k] = v"),
    ("worker", "return ngx.worker[(...)]()"),
    ("config", "return ngx.config[(...)]"),
    ("global.set", "leak = (...) _G.leak2 = select(2, ...)"),
    ("rawset", "return rawset(...)"),
    ("rawget", "return rawget(...)"),
    ("setmetatable", "return setmetatable(...)"),
    ("getmetatable", "return getmetatable(...)"),
    ("tostring", "return tostring(...)"),
    ("tonumber", "return tonumber(...)"),
    ("type", "return type(...)"),
    ("concat", "return table.concat(...)"),
    ("insert", "return table.insert(...)"),
    ("rep", "return string.rep(...)"),
    ("format", "return string.format(...)"),
    ("byte", "return string.byte(...)"),
    ("char", "return string.char(...)"),
    ("lower", "return string.lower(...)"),
    ("sub", "return string.sub(...)"),
    ("len", "return #(...)"),
    ("cat", "local a, b = ... return a .. b"),
    ("eq", "local a, b = ... return a == b, a < b"),
    (
        "pairs",
        "local n = 0 for k, v in pairs((...)) do n = n + 1 if n > 64 then break end end return n",
    ),
    (
        "ipairs",
        "local n = 0 for i, v in ipairs((...)) do n = n + 1 if n > 64 then break end end return n",
    ),
    ("next", "return next(...)"),
    ("unpack", "return unpack(...)"),
    ("select", "return select(...)"),
    ("pcall", "return pcall(...)"),
    ("xpcall", "return xpcall(...)"),
    ("call", "local f = ... return f(select(2, ...))"),
    ("error", "error(...)"),
    ("assert", "return assert(...)"),
    ("collectgarbage", "return collectgarbage(...)"),
    ("os.date", "return os.date(...)"),
    ("os.time", "return os.time(...)"),
    ("bit.band", "return bit.band(...)"),
    ("bit.tohex", "return bit.tohex(...)"),
    ("math.floor", "return math.floor(...)"),
];

/// Lua defined before the calls: results, helpers and the hostile values `@names` use.
/// `D` maps every string to one of a fixed few dictionary names, so the engine's
/// 32-dictionary cap is never reached (a known problem tracked apart: issue 17, finding 6)
/// and each run starts from the same (flushed) dictionaries.
const PRELUDE: &str = r#"local r = {}
local function R(n) local t = r[n] if t then return t[2] end end
local DICTS = { "cache", "limits", "fuzz1", "fuzz2" }
local function D(x) if type(x) == "string" then return DICTS[#x % 4 + 1] end return x end
local hostile = {
  __index = function() error("hostile __index") end,
  __newindex = function() error("hostile __newindex") end,
  __tostring = function() error("hostile __tostring") end,
  __len = function() error("hostile __len") end,
  __concat = function() error("hostile __concat") end,
  __call = function() error("hostile __call") end,
  __eq = function() error("hostile __eq") end,
  __lt = function() error("hostile __lt") end,
}
local lying = { __index = function(_, k) return k end, __len = function() return 1e9 end }
local cycle = {} cycle[1] = cycle cycle.self = cycle
for _, name in ipairs(DICTS) do local d = ngx.shared[name] if d then d:flush_all() end end
"#;

/// The value an `@name` stands for.
fn special(name: &str) -> &'static str {
    match name {
        "f1" => "function(...) return ... end",
        "f2" => "function() return 'x' end",
        "f3" => "function() error('callback error') end",
        "f4" => "function(m) return m and m[0] end",
        "f5" => "function() return {} end",
        "f6" => "function() return nil end",
        "f7" => "function() return ngx.exit(403) end",
        "f8" => "function() return 1e308 end",
        "f9" => "function(m) return (ngx.re.sub(m and m[0] or '', 'a', 'b')) end",
        "f10" => "function() return ngx.shared.cache:incr('calls', 1, 0) end",
        "ctx" => "ngx.ctx",
        "ngx" => "ngx",
        "header" => "ngx.header",
        "var" => "ngx.var",
        "shared" => "ngx.shared",
        "req" => "ngx.req",
        "re" => "ngx.re",
        "request" => "request",
        "string" => "string",
        "G" => "_G",
        "dict" => "ngx.shared.cache",
        "big" => "string.rep('A', 4096)",
        "bigpct" => "string.rep('%41', 1400)",
        "huge" => "string.rep('a', 65536)",
        "bin" => "'\\0\\255\\r\\n\\t '",
        "utf8" => "'\\195\\169\\226\\130\\172\\240\\157\\132\\158'",
        "crlf" => "'a\\r\\nSet-Cookie: x=1'",
        "mt" => "setmetatable({}, hostile)",
        "lying" => "setmetatable({}, lying)",
        "cycle" => "cycle",
        "array" => "{ 'a', 'b', 1, 2.5, true }",
        "holes" => "{ 'a', nil, 'c', [10] = 'j' }",
        "many" => "(function() local t = {} for i = 1, 200 do t[i] = 'v' .. i end return t end)()",
        "keys" => "(function() local t = {} for i = 1, 200 do t['k' .. i] = i end return t end)()",
        "userdata" => "ngx.null",
        _ => "nil",
    }
}

const SPECIALS: &[&str] = &[
    "f1", "f2", "f3", "f4", "f5", "f6", "f7", "f8", "f9", "f10", "ctx", "ngx", "header", "var",
    "shared", "req", "re", "request", "string", "G", "dict", "big", "bigpct", "huge", "bin",
    "utf8", "crlf", "mt", "lying", "cycle", "array", "holes", "many", "keys", "userdata",
];

/// The script that runs after every fuzzed one, for another domain on the same thread. It
/// answers 403 with `X-Sentinel: ok` when everything it sees is as it should be, else 500
/// with the list of what was wrong.
pub const SENTINEL: &str = r##"local problems = {}
local function expect(ok, what) if not ok then problems[#problems + 1] = what end end
expect(ngx.var.request_uri == "/sentinel?s=1" and ngx.var.uri == "/sentinel", "ngx.var")
expect(ngx.var.http_x_sentinel == "yes" and request.headers["X-Fuzz"] == nil, "request headers")
expect(ngx.var.remote_addr == "198.51.100.77" and ngx.req.get_method() == "GET", "request")
expect(ngx.status == 0 and next(ngx.ctx) == nil, "ngx.status, ngx.ctx")
expect(rawget(_G, "leak") == nil and leak == nil and leak2 == nil, "globals")
expect(ngx.header["X-Fuzz"] == nil and ngx.header["Content-Type"] == nil, "ngx.header")
expect(("ab"):rep(2) == "abab" and string.format("%d", 7) == "7", "string")
expect(math.floor(2.5) == 2 and ngx.re.find("abc", "b") == 2, "math, ngx.re")
expect(pcall(error, "x") == false and type(ngx.shared.sentinel) == "userdata", "pcall, ngx.shared")
if #problems == 0 then
  ngx.header["X-Sentinel"] = "ok"
  return ngx.exit(403)
end
ngx.say(table.concat(problems, ","))
return ngx.exit(500)
"##;

fn engine() -> &'static WafEngine {
    static ENGINE: OnceLock<WafEngine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        crate::init_logging();
        WafEngine::new(WafOptions {
            fail_closed: false,
            instruction_budget: 2_000_000,
            // The instruction budget stops runaway scripts; a generous time budget keeps a
            // run preempted on a busy machine from being aborted, which would make the
            // sentinel's answer depend on the machine's load.
            time_budget: Duration::from_secs(5),
            memory_limit: 32 << 20,
            dict_capacity: 1 << 20,
            max_dicts: 32,
            clock: Clock::manual(1_800_000_000_000),
        })
    })
}

/// The snapshot every run reloads, with the fuzzed script put in its first domain.
fn template() -> &'static Snapshot {
    static TEMPLATE: OnceLock<Snapshot> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let doc = serde_json::json!({
            "success": true,
            "domains": [
                { "domain": "fuzz.example", "luaCode": "" },
                { "domain": "sentinel.example", "luaCode": SENTINEL },
            ],
        })
        .to_string();
        defenra_config::compile(doc.as_bytes())
            .expect("the template compiles")
            .snapshot
    })
}

/// The request a fuzzed script sees.
struct Request {
    target: String,
    method: Method,
    host: String,
    addr: IpAddr,
    headers: Vec<(String, Vec<u8>)>,
}

/// Target `waf_ngx`: `data` is a call sequence in the language described above.
pub fn ngx_calls(data: &[u8]) {
    let (script, request) = generate(data);
    if std::env::var_os("DEFENRA_FUZZ_PRINT").is_some() {
        eprintln!("{script}");
    }
    check_script(&script, &request);
}

/// Runs `script` for `request`, then the sentinel, and checks both answers.
fn check_script(script: &str, request: &Request) {
    let engine = engine();
    // The template's first domain gets the script; the sentinel's chunk stays loaded (its
    // source does not change between reloads).
    let mut snapshot = template().clone();
    let mut domain = (*snapshot.domains[0]).clone();
    domain.lua_code = Some(script.into());
    snapshot.domains[0] = Arc::new(domain);
    let mut issues = Vec::new();
    engine.reload(&Arc::new(snapshot), &mut issues);
    assert!(
        !issues
            .iter()
            .any(|issue| issue.path == "domains[1].luaCode"),
        "{issues:?}"
    );

    let pairs: Vec<(&str, &[u8])> = request
        .headers
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_slice()))
        .collect();
    let verdict = engine.check(&RequestInfo {
        domain: "fuzz.example",
        host: &request.host,
        method: &request.method,
        target: &request.target,
        headers: RequestHeaders::Pairs(&pairs),
        remote_addr: request.addr,
        scheme: "https",
        server_port: 443,
    });
    if let Verdict::Block { status, .. } = &verdict {
        assert!(
            (200..=999).contains(&status.as_u16()),
            "blocked with status {status}"
        );
    }

    let before = engine.stats().domain_totals("sentinel.example");
    let sentinel_headers: [(&str, &[u8]); 2] =
        [("Host", b"sentinel.example"), ("X-Sentinel", b"yes")];
    let sentinel = engine.check(&RequestInfo {
        domain: "sentinel.example",
        host: "sentinel.example",
        method: &Method::GET,
        target: "/sentinel?s=1",
        headers: RequestHeaders::Pairs(&sentinel_headers),
        remote_addr: "198.51.100.77".parse().expect("an address"),
        scheme: "http",
        server_port: 80,
    });
    match sentinel {
        // 403 with the sentinel's header and the error page's type, nothing else.
        Verdict::Block {
            status, headers, ..
        } if status == 403
            && headers.get("x-sentinel").is_some_and(|value| value == "ok")
            && headers
                .keys()
                .all(|name| name == "x-sentinel" || name == "content-type") => {}
        other => panic!(
            "the next script saw the fuzzed one's traces: {other:?}\n\
             sentinel (checks, blocks, errors, aborts) before {before:?}, after {:?}\n{script}",
            engine.stats().domain_totals("sentinel.example")
        ),
    }
}

/// Turns the input into a script and the request it runs for.
fn generate(data: &[u8]) -> (String, Request) {
    let mut request = Request {
        target: "/a/b/../c?x=1&y=%41&x=2&flag".to_owned(),
        method: Method::GET,
        host: "fuzz.example".to_owned(),
        addr: "192.0.2.7".parse().expect("an address"),
        headers: vec![
            ("Host".to_owned(), b"fuzz.example".to_vec()),
            ("User-Agent".to_owned(), b"Mozilla/5.0 (fuzz)".to_vec()),
            ("Cookie".to_owned(), b"a=1; session=abc".to_vec()),
            ("X-Forwarded-For".to_owned(), b"203.0.113.1".to_vec()),
            ("Accept".to_owned(), b"text/html".to_vec()),
            ("Accept".to_owned(), b"*/*".to_vec()),
        ],
    };
    let mut script = String::from(PRELUDE);
    let mut n_calls = 0;
    for line in data.split(|&byte| byte == b'\n') {
        if let Some(setting) = line.strip_prefix(b"#") {
            describe(&mut request, setting);
            continue;
        }
        if n_calls == MAX_CALLS {
            break;
        }
        let mut tokens = Tokens { rest: line };
        let Some(name) = tokens.word() else {
            continue;
        };
        let body = CALLS
            .iter()
            .find(|(call, _)| call.as_bytes() == name)
            .map_or_else(|| CALLS[hash(name) % CALLS.len()].1, |(_, body)| *body);
        let mut args = Vec::new();
        while args.len() < MAX_ARGS {
            let Some(arg) = tokens.value(n_calls, 0) else {
                break;
            };
            args.push(arg);
        }
        n_calls += 1;
        let _ = writeln!(
            script,
            "r[{n_calls}] = {{ pcall(function(...) {body} end, {}) }}",
            args.join(", ")
        );
    }
    (script, request)
}

/// Applies one `#` line to the request.
fn describe(request: &mut Request, setting: &[u8]) {
    let (key, value) = match setting.iter().position(|&byte| byte == b' ') {
        Some(at) => (&setting[..at], &setting[at + 1..]),
        None => (setting, &[][..]),
    };
    match key {
        b"target" => request.target = String::from_utf8_lossy(value).into_owned(),
        b"method" => {
            if let Ok(method) = Method::from_bytes(value) {
                request.method = method;
            }
        }
        b"host" => request.host = String::from_utf8_lossy(value).to_lowercase(),
        b"addr" => {
            if let Some(addr) = std::str::from_utf8(value)
                .ok()
                .and_then(|text| text.parse().ok())
            {
                request.addr = addr;
            }
        }
        b"header" if request.headers.len() < 64 => {
            let (name, value) = match value.iter().position(|&byte| byte == b' ') {
                Some(at) => (&value[..at], &value[at + 1..]),
                None => (value, &[][..]),
            };
            request
                .headers
                .push((String::from_utf8_lossy(name).into_owned(), value.to_vec()));
        }
        _ => {}
    }
}

fn hash(bytes: &[u8]) -> usize {
    bytes.iter().fold(0x811c_9dc5_u32, |hash, &byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    }) as usize
}

/// The tokens of one line.
struct Tokens<'a> {
    rest: &'a [u8],
}

impl<'a> Tokens<'a> {
    fn skip_spaces(&mut self) {
        while let [b' ' | b'\t' | b'\r', rest @ ..] = self.rest {
            self.rest = rest;
        }
    }

    /// The next space-separated word (never empty).
    fn word(&mut self) -> Option<&'a [u8]> {
        self.skip_spaces();
        let end = self
            .rest
            .iter()
            .position(|&byte| matches!(byte, b' ' | b'\t' | b'\r' | b'}'))
            .unwrap_or(self.rest.len());
        if end == 0 {
            return None;
        }
        let (word, rest) = self.rest.split_at(end);
        self.rest = rest;
        Some(word)
    }

    /// The next argument as a Lua expression; `n_calls` results exist so far.
    fn value(&mut self, n_calls: usize, depth: usize) -> Option<String> {
        self.skip_spaces();
        match self.rest.first()? {
            b'"' => {
                self.rest = &self.rest[1..];
                Some(self.string())
            }
            b'{' => {
                self.rest = &self.rest[1..];
                Some(self.table(n_calls, depth + 1))
            }
            b'}' => None,
            _ => {
                let word = self.word()?;
                Some(atom(word, n_calls))
            }
        }
    }

    /// A quoted string after its opening quote, as a Lua literal with every byte escaped.
    fn string(&mut self) -> String {
        let mut bytes = Vec::new();
        loop {
            match self.rest {
                [] => break,
                [b'"', rest @ ..] => {
                    self.rest = rest;
                    break;
                }
                [b'\\', escaped, rest @ ..] => {
                    self.rest = rest;
                    match escaped {
                        b'n' => bytes.push(b'\n'),
                        b'r' => bytes.push(b'\r'),
                        b'0' => bytes.push(0),
                        b'x' => {
                            let hex = self.rest.get(..2).and_then(|digits| {
                                u8::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
                            });
                            match hex {
                                Some(byte) => {
                                    bytes.push(byte);
                                    self.rest = &self.rest[2..];
                                }
                                None => bytes.push(b'x'),
                            }
                        }
                        other => bytes.push(*other),
                    }
                }
                [byte, rest @ ..] => {
                    bytes.push(*byte);
                    self.rest = rest;
                }
            }
        }
        lua_string(&bytes)
    }

    /// A table constructor after its `{`: values, and `key=value` pairs.
    fn table(&mut self, n_calls: usize, depth: usize) -> String {
        let mut fields = Vec::new();
        loop {
            self.skip_spaces();
            if let [b'}', rest @ ..] = self.rest {
                self.rest = rest;
                break;
            }
            if fields.len() == MAX_ARGS * 2 || depth > MAX_TABLE_DEPTH {
                // Drop the rest of this table.
                let end = self
                    .rest
                    .iter()
                    .position(|&byte| byte == b'}')
                    .map_or(self.rest.len(), |at| at + 1);
                self.rest = &self.rest[end..];
                break;
            }
            let key = self.key();
            let Some(value) = self.value(n_calls, depth) else {
                break;
            };
            fields.push(match key {
                Some(key) => format!("[{}] = {value}", lua_string(key)),
                None => value,
            });
        }
        format!("{{ {} }}", fields.join(", "))
    }

    /// A `key=` before a table field, if there is one.
    fn key(&mut self) -> Option<&'a [u8]> {
        let end = self
            .rest
            .iter()
            .position(|&byte| matches!(byte, b' ' | b'\t' | b'"' | b'{' | b'}'))
            .unwrap_or(self.rest.len());
        let equals = self.rest[..end].iter().position(|&byte| byte == b'=')?;
        if equals == 0 {
            return None;
        }
        let key = &self.rest[..equals];
        self.rest = &self.rest[equals + 1..];
        Some(key)
    }
}

/// A bare word as a Lua expression.
fn atom(word: &[u8], n_calls: usize) -> String {
    match word {
        b"nil" => return "nil".to_owned(),
        b"true" => return "true".to_owned(),
        b"false" => return "false".to_owned(),
        b"null" => return "ngx.null".to_owned(),
        b"nan" => return "(0/0)".to_owned(),
        b"inf" => return "math.huge".to_owned(),
        b"-inf" => return "(-math.huge)".to_owned(),
        b"-0" => return "(-0.0)".to_owned(),
        b"huge" => return "1e308".to_owned(),
        _ => {}
    }
    if let [b'$', digits @ ..] = word {
        let n = std::str::from_utf8(digits)
            .ok()
            .and_then(|digits| digits.parse::<usize>().ok())
            .unwrap_or(0);
        return if n_calls == 0 {
            "nil".to_owned()
        } else {
            format!("R({})", n % n_calls + 1)
        };
    }
    if let [b'@', name @ ..] = word {
        let name = std::str::from_utf8(name).unwrap_or("");
        let name = if SPECIALS.contains(&name) {
            name
        } else {
            SPECIALS[hash(name.as_bytes()) % SPECIALS.len()]
        };
        return format!("({})", special(name));
    }
    if let Some(number) = std::str::from_utf8(word)
        .ok()
        .and_then(|text| text.parse::<f64>().ok())
        && number.is_finite()
    {
        // `{:?}` never prints a form Lua cannot read back (no `inf`, no `NaN` here).
        return format!("({number:?})");
    }
    lua_string(word)
}

/// `bytes` as a Lua string literal: printable ASCII as it is, everything else as `\ddd`.
fn lua_string(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() + 2);
    out.push('"');
    for &byte in bytes {
        match byte {
            b'"' | b'\\' => {
                out.push('\\');
                out.push(byte as char);
            }
            0x20..=0x7e => out.push(byte as char),
            _ => {
                let _ = write!(out, "\\{byte:03}");
            }
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_generate_the_calls_they_spell() {
        let (script, request) = generate(
            b"#target /x?q=1\n#header X-A b c\nre.match \"a b\" {1 k=v {2}} $0 @f1 nan 7\nsay $1",
        );
        assert_eq!(request.target, "/x?q=1");
        assert_eq!(request.headers.last().unwrap().1, b"b c");
        assert!(script.contains(
            "r[1] = { pcall(function(...) return ngx.re.match(...) end, \"a b\", \
             { (1.0), [\"k\"] = \"v\", { (2.0) } }, nil, (function(...) return ... end), (0/0), (7.0)) }"
        ), "{script}");
        assert!(
            script.contains("return ngx.say(...) end, R(1))"),
            "{script}"
        );
    }
}

//! The Rust half of the `ngx` API and the legacy `request` table: per-request context and
//! the host functions `sandbox.lua` wires into read-only tables.

use std::cell::{Cell, RefCell};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use base64::Engine as _;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method};
use md5::Digest as _;
use mlua::{IntoLuaMulti as _, Lua, MultiValue, Table, Value, Variadic};
use percent_encoding::{AsciiSet, CONTROLS, NON_ALPHANUMERIC, percent_decode};

use crate::RequestInfo;
use crate::clock::{Clock, utc_parts};
use crate::dict::{DictHandle, SharedDicts};
use crate::geo::{LocatorCell, RequestLocation};
use crate::headers::HeaderList;
use crate::limit::LogLimiter;
use crate::re::RegexCache;

/// Largest body `ngx.say`/`ngx.print` may build; the memory is outside the Lua cap.
const MAX_BODY: usize = 1 << 20;
/// Most response headers a script may set.
const MAX_HEADERS: usize = 100;
/// Longest `ngx.log` message, in bytes, before the `... [N more bytes]` marker: nginx cuts
/// its error log lines at 2,048 bytes (`NGX_MAX_ERROR_STR`).
pub(crate) const MAX_LOG_LINE: usize = 2000;

/// `ngx.*` constants as OpenResty defines them.
pub(crate) const CONSTANTS: &[(&str, i64)] = &[
    ("OK", 0),
    ("ERROR", -1),
    ("AGAIN", -2),
    ("DONE", -4),
    ("DECLINED", -5),
    ("HTTP_CONTINUE", 100),
    ("HTTP_SWITCHING_PROTOCOLS", 101),
    ("HTTP_OK", 200),
    ("HTTP_CREATED", 201),
    ("HTTP_ACCEPTED", 202),
    ("HTTP_NO_CONTENT", 204),
    ("HTTP_PARTIAL_CONTENT", 206),
    ("HTTP_SPECIAL_RESPONSE", 300),
    ("HTTP_MOVED_PERMANENTLY", 301),
    ("HTTP_MOVED_TEMPORARILY", 302),
    ("HTTP_SEE_OTHER", 303),
    ("HTTP_NOT_MODIFIED", 304),
    ("HTTP_TEMPORARY_REDIRECT", 307),
    ("HTTP_PERMANENT_REDIRECT", 308),
    ("HTTP_BAD_REQUEST", 400),
    ("HTTP_UNAUTHORIZED", 401),
    ("HTTP_PAYMENT_REQUIRED", 402),
    ("HTTP_FORBIDDEN", 403),
    ("HTTP_NOT_FOUND", 404),
    ("HTTP_NOT_ALLOWED", 405),
    ("HTTP_NOT_ACCEPTABLE", 406),
    ("HTTP_REQUEST_TIMEOUT", 408),
    ("HTTP_CONFLICT", 409),
    ("HTTP_GONE", 410),
    ("HTTP_UPGRADE_REQUIRED", 426),
    ("HTTP_TOO_MANY_REQUESTS", 429),
    ("HTTP_CLOSE", 444),
    ("HTTP_ILLEGAL", 451),
    ("HTTP_INTERNAL_SERVER_ERROR", 500),
    ("HTTP_METHOD_NOT_IMPLEMENTED", 501),
    ("HTTP_BAD_GATEWAY", 502),
    ("HTTP_SERVICE_UNAVAILABLE", 503),
    ("HTTP_GATEWAY_TIMEOUT", 504),
    ("HTTP_VERSION_NOT_SUPPORTED", 505),
    ("HTTP_INSUFFICIENT_STORAGE", 507),
    ("HTTP_GET", 2),
    ("HTTP_HEAD", 4),
    ("HTTP_POST", 8),
    ("HTTP_PUT", 16),
    ("HTTP_DELETE", 32),
    ("HTTP_MKCOL", 64),
    ("HTTP_COPY", 128),
    ("HTTP_MOVE", 256),
    ("HTTP_OPTIONS", 512),
    ("HTTP_PROPFIND", 1024),
    ("HTTP_PROPPATCH", 2048),
    ("HTTP_LOCK", 4096),
    ("HTTP_UNLOCK", 8192),
    ("HTTP_PATCH", 16384),
    ("HTTP_TRACE", 32768),
    ("STDERR", 0),
    ("EMERG", 1),
    ("ALERT", 2),
    ("CRIT", 3),
    ("ERR", 4),
    ("WARN", 5),
    ("NOTICE", 6),
    ("INFO", 7),
    ("DEBUG", 8),
];

/// Why a run was stopped from outside the script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Abort {
    /// More VM instructions than the budget allows.
    Instructions,
    /// Longer than the time budget.
    Time,
}

/// Everything the host functions of one Lua state share: the current request, the response
/// being built, and the run's budget. One per worker state, refilled for every request.
pub(crate) struct Ctx {
    pub(crate) request: RefCell<RequestData>,
    pub(crate) response: RefCell<ResponseData>,
    /// Set by `ngx.exit` (and `ngx.redirect`): the run is over with this code.
    pub(crate) exit: Cell<Option<i64>>,
    /// Set by the instruction hook when the budget ran out.
    pub(crate) abort: Cell<Option<Abort>>,
    /// Hook calls left before the instruction budget is exhausted.
    hooks_left: Cell<u64>,
    /// The run's time budget, and the deadline it gives once the first hook call has read
    /// the clock (most runs end before that: no clock read at all).
    time_budget: Cell<std::time::Duration>,
    deadline: Cell<Option<Instant>>,
    pub(crate) clock: Clock,
    pub(crate) regexes: RefCell<RegexCache>,
    /// Response header names and values scripts set, parsed once per state.
    header_cache: RefCell<HeaderCache>,
    pub(crate) script_logs: Arc<LogLimiter>,
    /// The state's memory cap, restored by [`unmetered`].
    pub(crate) memory_limit: usize,
    /// Where the C stack was when the run started ([`stack_address`]), 0 between runs:
    /// [`Ctx::check_c_stack`] measures from here.
    pub(crate) stack_base: Cell<usize>,
    /// The source of `ngx.var.geoip_*` (the engine's, swappable).
    pub(crate) locator: Arc<LocatorCell>,
}

/// C stack one run may use below the point where it started, checked wherever C or Rust
/// code calls back into Lua (`string.gsub` with a function or table, `table.sort`,
/// `string.format` with `__tostring`, `os.time` with `__index`, `ngx.re.sub`/`gsub` with a
/// function). Lua's own calls use the Lua stack, which LuaJIT bounds, but each of those
/// callbacks adds C frames (8.8 KB for `string.gsub`) that nothing else limits: a script
/// recursing through them overflowed the worker thread's stack and the process died.
/// 1 MiB fits beside the proxy's own frames in a 2 MiB thread stack (the agent gives its
/// HTTP workers 16 MiB) and allows about a hundred nested `gsub` callbacks, where Lua 5.1
/// allowed 200 nested C calls of any size (`LUAI_MAXCCALLS`).
pub(crate) const MAX_C_STACK: usize = 1 << 20;

/// The error a script gets past [`MAX_C_STACK`]; Lua's message for the same limit.
pub(crate) const C_STACK_OVERFLOW: &str =
    "C stack overflow (callbacks from C into Lua nested too deeply)";

/// The current stack address, approximately (the address of a local of this function).
#[inline(never)]
pub(crate) fn stack_address() -> usize {
    let marker = 0u8;
    std::hint::black_box(&marker) as *const u8 as usize
}

impl Ctx {
    pub(crate) fn new(
        clock: Clock,
        script_logs: Arc<LogLimiter>,
        memory_limit: usize,
        locator: Arc<LocatorCell>,
    ) -> Self {
        Ctx {
            request: RefCell::new(RequestData::default()),
            response: RefCell::new(ResponseData::default()),
            exit: Cell::new(None),
            abort: Cell::new(None),
            hooks_left: Cell::new(u64::MAX),
            time_budget: Cell::new(std::time::Duration::from_secs(3600)),
            deadline: Cell::new(None),
            clock,
            regexes: RefCell::new(RegexCache::new()),
            header_cache: RefCell::new(HeaderCache::default()),
            script_logs,
            memory_limit,
            stack_base: Cell::new(0),
            locator,
        }
    }

    /// Resets the per-request state for a new run.
    pub(crate) fn begin(
        &self,
        request: &RequestInfo<'_>,
        hooks: u64,
        time_budget: std::time::Duration,
    ) {
        self.request.borrow_mut().fill(request);
        self.response.borrow_mut().clear();
        self.exit.set(None);
        self.abort.set(None);
        self.hooks_left.set(hooks);
        self.time_budget.set(time_budget);
        self.deadline.set(None);
    }

    /// Called by the instruction hook; `Err` aborts the run.
    pub(crate) fn tick(&self) -> Result<(), Abort> {
        self.spend(1)
    }

    /// Charges `steps` steps of work done inside a library function (pattern matching,
    /// `pattern.rs`) to the instruction budget, at the hook's rate of one unit per
    /// [`HOOK_INTERVAL`](crate::sandbox::HOOK_INTERVAL), and checks the clock; `Err` aborts
    /// the run.
    pub(crate) fn charge(&self, steps: u32) -> Result<(), Abort> {
        self.spend(u64::from(steps).div_ceil(u64::from(crate::sandbox::HOOK_INTERVAL)))
    }

    fn spend(&self, units: u64) -> Result<(), Abort> {
        if let Some(abort) = self.abort.get() {
            return Err(abort);
        }
        let left = self.hooks_left.get();
        let now = Instant::now();
        let deadline = match self.deadline.get() {
            Some(deadline) => deadline,
            None => {
                // The first hook call (or charge) of a run starts the clock: at most one
                // hook interval (a few microseconds of Lua) later than the run itself.
                let deadline = now + self.time_budget.get();
                self.deadline.set(Some(deadline));
                deadline
            }
        };
        let abort = if left < units {
            Abort::Instructions
        } else if now >= deadline {
            Abort::Time
        } else {
            self.hooks_left.set(left - units);
            return Ok(());
        };
        self.abort.set(Some(abort));
        Err(abort)
    }

    /// `Err` when the run has used more than [`MAX_C_STACK`] of C stack since it started
    /// (the stack grows down on every target the agent supports).
    pub(crate) fn check_c_stack(&self) -> Result<(), &'static str> {
        let used = self.stack_base.get().saturating_sub(stack_address());
        if used > MAX_C_STACK {
            Err(C_STACK_OVERFLOW)
        } else {
            Ok(())
        }
    }

    fn stopping(&self) -> bool {
        self.exit.get().is_some() || self.abort.get().is_some()
    }
}

/// The request as the script sees it: an owned copy, so the Lua state can outlive the
/// borrowed [`RequestInfo`]. Buffers are reused between requests.
pub(crate) struct RequestData {
    pub(crate) domain: String,
    host: String,
    method: Method,
    /// Path and query as received.
    target: String,
    headers: HeaderList,
    remote_addr: IpAddr,
    scheme: &'static str,
    server_port: u16,
    /// `ngx.req.start_time()`, read from the clock on first use.
    start_unix_ms: Option<u64>,
    /// `ngx.var.uri`, decoded and normalised on first use.
    normalized_path: Option<Vec<u8>>,
    /// `ngx.var.geoip_*`, looked up on first use.
    location: RequestLocation,
}

impl Default for RequestData {
    fn default() -> Self {
        RequestData {
            domain: String::new(),
            host: String::new(),
            method: Method::GET,
            target: String::new(),
            headers: HeaderList::default(),
            remote_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            scheme: "http",
            server_port: 0,
            start_unix_ms: None,
            normalized_path: None,
            location: RequestLocation::default(),
        }
    }
}

impl RequestData {
    fn fill(&mut self, request: &RequestInfo<'_>) {
        self.domain.clear();
        self.domain.push_str(request.domain);
        self.host.clear();
        self.host.push_str(request.host);
        self.method.clone_from(request.method);
        self.target.clear();
        self.target.push_str(request.target);
        self.headers.fill(request.headers);
        self.remote_addr = request.remote_addr;
        self.scheme = request.scheme;
        self.server_port = request.server_port;
        self.start_unix_ms = None;
        self.normalized_path = None;
        self.location.reset();
    }

    fn request_uri(&self) -> &str {
        if self.target.is_empty() {
            "/"
        } else {
            &self.target
        }
    }

    /// The target without its query.
    fn path(&self) -> &str {
        let target = self.request_uri();
        target.split_once('?').map_or(target, |(path, _)| path)
    }

    /// The query without `?`, `None` when the target has no `?`.
    fn query(&self) -> Option<&str> {
        self.target.split_once('?').map(|(_, query)| query)
    }

    fn normalized_path(&mut self) -> &[u8] {
        if self.normalized_path.is_none() {
            self.normalized_path = Some(normalize_path(self.path()));
        }
        self.normalized_path.get_or_insert_default()
    }
}

/// What the script asked to send back.
#[derive(Default)]
pub(crate) struct ResponseData {
    /// `ngx.status`, when the script set it.
    pub(crate) status: Option<u16>,
    /// `ngx.header[...]`.
    pub(crate) headers: HeaderMap,
    /// `ngx.say`/`ngx.print` output.
    pub(crate) body: Vec<u8>,
}

impl ResponseData {
    fn clear(&mut self) {
        self.status = None;
        self.headers.clear();
        self.body.clear();
    }
}

/// Runs `f` with the state's memory cap lifted, then puts the cap back.
///
/// With a cap set, mlua creates every string and table inside a protected call, and under
/// LuaJIT that call first allocates two C closures: about 150 ns per value. Without a cap an
/// allocation cannot fail (short of the process running out of memory), so mlua creates
/// values directly. Only for values whose size the request bounds (variables, headers):
/// what `f` allocates still counts towards the cap, and the script's next allocation fails
/// if it went over.
pub(crate) fn unmetered<R>(lua: &Lua, limit: usize, f: impl FnOnce() -> R) -> R {
    struct Restore<'a>(&'a Lua, usize);
    impl Drop for Restore<'_> {
        fn drop(&mut self) {
            let _ = self.0.set_memory_limit(self.1);
        }
    }
    let _ = lua.set_memory_limit(0);
    let _restore = Restore(lua, limit);
    f()
}

/// The dictionaries a state has handed out, by index, for the fast dictionary functions
/// (`dict::install_fast`). Each (domain, name) is resolved once per loaded chunk
/// (`sandbox.lua` caches it), so this holds at most `max_dicts` per domain; it is emptied,
/// with every chunk, when dictionaries are freed (`Sandbox::forget_dicts`).
pub(crate) type DictHandles = Rc<RefCell<Vec<Arc<crate::dict::Dict>>>>;

/// Creates the `host` table of Rust functions that `sandbox.lua` builds the API from.
/// `handles` lists the dictionaries this state has handed out, by index (see
/// [`DictHandles`]).
pub(crate) fn host_table(
    lua: &Lua,
    ctx: &Rc<Ctx>,
    dicts: &Arc<SharedDicts>,
    handles: &DictHandles,
) -> mlua::Result<Table> {
    let host = lua.create_table()?;

    let constants = lua.create_table()?;
    for &(name, value) in CONSTANTS {
        constants.raw_set(name, value)?;
    }
    host.raw_set("constants", constants)?;
    host.raw_set("null", Value::NULL)?;

    let c = Rc::clone(ctx);
    host.raw_set(
        "stopping",
        lua.create_function(move |_, ()| Ok(c.stopping()))?,
    )?;

    // `sandbox.lua` calls this on entry to the library functions that call back into Lua.
    let ctx_ptr: *const Ctx = Rc::as_ptr(ctx);
    // SAFETY: as for `header_set` below: the light userdata points at the `Ctx` that the
    // state's own callbacks hold, so it lives as long as the state.
    #[allow(unsafe_code)]
    let check: mlua::Function = unsafe {
        lua.exec_raw((), |state| {
            mlua::ffi::lua_pushlightuserdata(state, ctx_ptr as *mut std::ffi::c_void);
            mlua::ffi::lua_pushcclosure(state, raw_c_stack_check, 1);
        })?
    };
    host.raw_set("c_stack_check", check)?;

    let c = Rc::clone(ctx);
    host.raw_set(
        "var",
        lua.create_function(move |lua, name: Value| {
            let Value::String(name) = name else {
                return Ok(Value::Nil);
            };
            let mut request = c.request.borrow_mut();
            unmetered(lua, c.memory_limit, || {
                var(lua, &mut request, &name.as_bytes(), &c.locator)
            })
        })?,
    )?;

    let c = Rc::clone(ctx);
    host.raw_set(
        "legacy",
        lua.create_function(move |lua, (_table, key): (Value, Value)| {
            let Value::String(key) = key else {
                return Ok(Value::Nil);
            };
            let request = c.request.borrow();
            let text = match &*key.as_bytes() {
                b"method" => request.method.as_str().to_owned(),
                b"uri" => request.request_uri().to_owned(),
                b"host" => request.host.clone(),
                b"remote_addr" => request.remote_addr.to_string(),
                b"scheme" => request.scheme.to_owned(),
                _ => return Ok(Value::Nil),
            };
            lua.create_string(text).map(Value::String)
        })?,
    )?;

    let c = Rc::clone(ctx);
    host.raw_set(
        "legacy_header",
        lua.create_function(move |lua, (_proxy, name): (Value, Value)| {
            let Value::String(name) = name else {
                return Ok(Value::Nil);
            };
            let request = c.request.borrow();
            match request.headers.first_ignore_case(&name.as_bytes()) {
                Some(value) => lua.create_string(value).map(Value::String),
                None => Ok(Value::Nil),
            }
        })?,
    )?;

    let c = Rc::clone(ctx);
    let headers_mt = lua.create_table()?;
    host.raw_set("headers_mt", headers_mt.clone())?;
    host.raw_set(
        "get_headers",
        lua.create_function(move |lua, (max, _raw): (Option<usize>, Option<bool>)| {
            let request = c.request.borrow();
            let max = max.unwrap_or(100);
            let table = lua.create_table()?;
            let mut count = 0;
            let mut truncated = false;
            'names: for (name, values) in request.headers.grouped() {
                let mut strings = Vec::new();
                for value in values {
                    if max != 0 && count >= max {
                        truncated = true;
                        if strings.is_empty() {
                            break 'names;
                        }
                        break;
                    }
                    count += 1;
                    strings.push(lua.create_string(value)?);
                }
                let name = lua.create_string(name)?;
                if strings.len() == 1 {
                    table.raw_set(name, strings.pop())?;
                } else {
                    table.raw_set(name, lua.create_sequence_from(strings)?)?;
                }
                if truncated {
                    break;
                }
            }
            table.set_metatable(Some(headers_mt.clone()))?;
            if truncated {
                (table, "truncated").into_lua_multi(lua)
            } else {
                (table,).into_lua_multi(lua)
            }
        })?,
    )?;

    let c = Rc::clone(ctx);
    host.raw_set(
        "get_method",
        lua.create_function(move |_, ()| Ok(c.request.borrow().method.as_str().to_owned()))?,
    )?;

    let c = Rc::clone(ctx);
    host.raw_set(
        "get_uri_args",
        lua.create_function(move |lua, max: Option<usize>| {
            let request = c.request.borrow();
            let query = request.query().unwrap_or("");
            decode_args(lua, query.as_bytes(), max.unwrap_or(100))
        })?,
    )?;
    host.raw_set(
        "decode_args",
        lua.create_function(|lua, (text, max): (mlua::LuaString, Option<usize>)| {
            decode_args(lua, &text.as_bytes(), max.unwrap_or(100))
        })?,
    )?;

    let c = Rc::clone(ctx);
    host.raw_set(
        "start_time",
        lua.create_function(move |_, ()| {
            let mut request = c.request.borrow_mut();
            let ms = *request
                .start_unix_ms
                .get_or_insert_with(|| c.clock.unix_ms());
            Ok(ms as f64 / 1000.0)
        })?,
    )?;

    let c = Rc::clone(ctx);
    host.raw_set(
        "status_get",
        lua.create_function(move |_, ()| Ok(c.response.borrow().status.unwrap_or(0)))?,
    )?;
    let c = Rc::clone(ctx);
    host.raw_set(
        "status_set",
        lua.create_function(move |_, status: Value| {
            let code = integer(&status)
                .filter(|code| (0..=999).contains(code))
                .ok_or_else(|| mlua::Error::runtime("ngx.status must be a status code"))?;
            c.response.borrow_mut().status = (code != 0).then_some(code as u16);
            Ok(())
        })?,
    )?;

    let c = Rc::clone(ctx);
    host.raw_set(
        "header_get",
        lua.create_function(move |lua, (_proxy, name): (Value, mlua::LuaString)| {
            let name = response_header_name(&name.as_bytes())?;
            let response = c.response.borrow();
            let mut values = response.headers.get_all(&name).iter();
            let Some(first) = values.next() else {
                return Ok(Value::Nil);
            };
            let rest: Vec<&HeaderValue> = values.collect();
            if rest.is_empty() {
                return lua.create_string(first.as_bytes()).map(Value::String);
            }
            let table = lua.create_table()?;
            table.raw_push(lua.create_string(first.as_bytes())?)?;
            for value in rest {
                table.raw_push(lua.create_string(value.as_bytes())?)?;
            }
            Ok(Value::Table(table))
        })?,
    )?;
    let c = Rc::clone(ctx);
    let header_set = lua.create_function(
        move |_, (_proxy, name, value): (Value, mlua::LuaString, Value)| {
            let mut cache = c.header_cache.borrow_mut();
            let name = cache.name(&name.as_bytes())?;
            let mut response = c.response.borrow_mut();
            let headers = &mut response.headers;
            let values = match &value {
                Value::Nil => Vec::new(),
                Value::Table(list) => {
                    let mut values = Vec::new();
                    for item in list.sequence_values::<Value>() {
                        values.push(cache.value(&item?)?);
                    }
                    values
                }
                single => {
                    // The common case, without a `Vec`.
                    let value = cache.value(single)?;
                    return set_single(headers, name, value).map_err(mlua::Error::runtime);
                }
            };
            if is_framing_header(&name) {
                return Ok(());
            }
            headers.remove(&name);
            if headers.len() + values.len() > MAX_HEADERS {
                return Err(mlua::Error::runtime("too many response headers"));
            }
            for value in values {
                headers.append(name.clone(), value);
            }
            Ok(())
        },
    )?;
    // `ngx.header[name] = "value"` is the common case: a raw C function does it, without
    // mlua's callback machinery; anything else goes to the function above.
    let ctx_ptr: *const Ctx = Rc::as_ptr(ctx);
    // SAFETY: the light userdata points at the `Ctx` that the state's own callbacks hold
    // (`c` clones), so it lives as long as the state; `header_set` is pushed as a value.
    #[allow(unsafe_code)]
    let fast: mlua::Function = unsafe {
        lua.exec_raw(header_set, |state| {
            // The slow function is the one argument on the stack: make it upvalue 2.
            mlua::ffi::lua_pushlightuserdata(state, ctx_ptr as *mut std::ffi::c_void);
            mlua::ffi::lua_insert(state, -2);
            mlua::ffi::lua_pushcclosure(state, raw_header_set, 2);
        })?
    };
    host.raw_set("header_set", fast)?;

    let c = Rc::clone(ctx);
    host.raw_set(
        "exit",
        lua.create_function(move |_, status: Value| -> mlua::Result<()> {
            let code = integer(&status)
                .filter(|code| matches!(code, -5..=0 | 100..=999))
                .ok_or_else(|| mlua::Error::runtime("ngx.exit: bad status code"))?;
            c.exit.set(Some(code));
            Err(mlua::Error::runtime("ngx.exit"))
        })?,
    )?;
    let c = Rc::clone(ctx);
    host.raw_set(
        "redirect",
        lua.create_function(
            move |_, (uri, status): (mlua::LuaString, Option<i64>)| -> mlua::Result<()> {
                let status = status.unwrap_or(302);
                if !matches!(status, 301 | 302 | 303 | 307 | 308) {
                    return Err(mlua::Error::runtime("ngx.redirect: bad status code"));
                }
                let location = HeaderValue::from_bytes(&uri.as_bytes())
                    .map_err(|_| mlua::Error::runtime("ngx.redirect: bad uri"))?;
                c.response
                    .borrow_mut()
                    .headers
                    .insert(http::header::LOCATION, location);
                c.exit.set(Some(status));
                Err(mlua::Error::runtime("ngx.exit"))
            },
        )?,
    )?;

    for (name, newline) in [("say", true), ("print", false)] {
        let c = Rc::clone(ctx);
        host.raw_set(
            name,
            lua.create_function(move |_, args: Variadic<Value>| {
                let mut response = c.response.borrow_mut();
                for arg in args.iter() {
                    append_value(&mut response.body, arg, 0)?;
                }
                if newline {
                    response.body.push(b'\n');
                }
                if response.body.len() > MAX_BODY {
                    return Err(mlua::Error::runtime("response body too large"));
                }
                Ok(1)
            })?,
        )?;
    }

    let c = Rc::clone(ctx);
    host.raw_set(
        "log",
        lua.create_function(move |_, (level, args): (Value, Variadic<Value>)| {
            let level = integer(&level)
                .filter(|level| (0..=8).contains(level))
                .ok_or_else(|| mlua::Error::runtime("ngx.log: bad log level"))?;
            let mut message = Vec::new();
            let mut cut = 0;
            for arg in args.iter() {
                cut += append_capped(&mut message, arg, MAX_LOG_LINE)?;
            }
            if cut > 0 {
                message.extend_from_slice(format!("... [{cut} more bytes]").as_bytes());
            }
            let Some(suppressed) = c
                .script_logs
                .allow(c.clock.unix_ms() / 1000, message.len() as u64)
            else {
                return Ok(());
            };
            let message = String::from_utf8_lossy(&message);
            let request = c.request.borrow();
            let domain = request.domain.as_str();
            match level {
                0..=4 => tracing::error!(domain, suppressed, "waf script: {message}"),
                5 => tracing::warn!(domain, suppressed, "waf script: {message}"),
                6 | 7 => tracing::info!(domain, suppressed, "waf script: {message}"),
                _ => tracing::debug!(domain, suppressed, "waf script: {message}"),
            }
            Ok(())
        })?,
    )?;

    let clock = ctx.clock.clone();
    host.raw_set(
        "time",
        lua.create_function(move |_, ()| Ok((clock.unix_ms() / 1000) as f64))?,
    )?;
    let clock = ctx.clock.clone();
    host.raw_set(
        "now",
        lua.create_function(move |_, ()| Ok(clock.unix_ms() as f64 / 1000.0))?,
    )?;
    let clock = ctx.clock.clone();
    host.raw_set(
        "today",
        lua.create_function(move |_, ()| {
            let (year, month, day, ..) = utc_parts((clock.unix_ms() / 1000) as i64);
            Ok(format!("{year:04}-{month:02}-{day:02}"))
        })?,
    )?;
    for name in ["localtime", "utctime"] {
        let clock = ctx.clock.clone();
        host.raw_set(
            name,
            lua.create_function(move |_, ()| {
                let (year, month, day, hour, minute, second, _) =
                    utc_parts((clock.unix_ms() / 1000) as i64);
                Ok(format!(
                    "{year:04}-{month:02}-{day:02} {hour:02}:{minute:02}:{second:02}"
                ))
            })?,
        )?;
    }
    host.raw_set(
        "http_time",
        lua.create_function(|_, seconds: f64| Ok(http_time(seconds as i64, false)))?,
    )?;
    host.raw_set(
        "cookie_time",
        lua.create_function(|_, seconds: f64| Ok(http_time(seconds as i64, true)))?,
    )?;

    host.raw_set(
        "md5",
        lua.create_function(|_, text: mlua::LuaString| {
            let digest = md5::Md5::digest(&*text.as_bytes());
            let mut hex = String::with_capacity(32);
            for byte in digest.iter() {
                let _ = write!(hex, "{byte:02x}");
            }
            Ok(hex)
        })?,
    )?;
    host.raw_set(
        "md5_bin",
        lua.create_function(|lua, text: mlua::LuaString| {
            let digest = md5::Md5::digest(&*text.as_bytes());
            lua.create_string(digest.as_slice())
        })?,
    )?;
    host.raw_set(
        "encode_base64",
        lua.create_function(|_, (text, no_padding): (mlua::LuaString, Option<bool>)| {
            let bytes = text.as_bytes();
            Ok(if no_padding.unwrap_or(false) {
                base64::engine::general_purpose::STANDARD_NO_PAD.encode(&*bytes)
            } else {
                base64::engine::general_purpose::STANDARD.encode(&*bytes)
            })
        })?,
    )?;
    host.raw_set(
        "decode_base64",
        lua.create_function(|lua, text: mlua::LuaString| {
            match base64::engine::general_purpose::STANDARD_PAD_INDIFFERENT
                .decode(&*text.as_bytes())
            {
                Ok(bytes) => lua.create_string(bytes).map(Value::String),
                Err(_) => Ok(Value::Nil),
            }
        })?,
    )?;
    host.raw_set(
        "escape_uri",
        lua.create_function(|_, (text, kind): (mlua::LuaString, Option<i64>)| {
            let set = if kind == Some(0) { URI } else { URI_COMPONENT };
            Ok(percent_encoding::percent_encode(&text.as_bytes(), set).to_string())
        })?,
    )?;
    host.raw_set(
        "unescape_uri",
        lua.create_function(|lua, text: mlua::LuaString| {
            lua.create_string(unescape(&text.as_bytes()))
        })?,
    )?;
    host.raw_set(
        "encode_args",
        lua.create_function(|_, args: Table| encode_args(&args))?,
    )?;
    host.raw_set(
        "quote_sql_str",
        lua.create_function(|lua, text: mlua::LuaString| {
            lua.create_string(quote_sql(&text.as_bytes()))
        })?,
    )?;

    crate::dict::install_fast(lua, &host, handles)?;
    let dicts = Arc::clone(dicts);
    let handles = Rc::clone(handles);
    let c = Rc::clone(ctx);
    host.raw_set(
        "dict",
        lua.create_function(move |lua, name: Value| {
            let Value::String(name) = name else {
                return Ok((Value::Nil, None));
            };
            let Ok(name) = name.to_str() else {
                return Ok((Value::Nil, None));
            };
            // The running script's domain: each domain has its own dictionaries.
            let dict = dicts.get_or_create(&c.request.borrow().domain, &name);
            match dict {
                Some(dict) => {
                    let mut handles = handles.borrow_mut();
                    let index = match handles.iter().position(|known| Arc::ptr_eq(known, &dict)) {
                        Some(index) => index,
                        None => {
                            handles.push(Arc::clone(&dict));
                            handles.len() - 1
                        }
                    };
                    let handle = lua.create_userdata(DictHandle(dict))?;
                    Ok((Value::UserData(handle), Some(index)))
                }
                None => Ok((Value::Nil, None)),
            }
        })?,
    )?;

    crate::re::install(lua, &host, ctx)?;
    crate::strlib::install(lua, &host, Rc::as_ptr(ctx))?;
    Ok(host)
}

/// `ngx.var.<name>`. Values are strings (as in nginx), `nil` when unknown or absent.
/// `geoip_*` variables come from `locator`, asked once per request.
pub(crate) fn var(
    lua: &Lua,
    request: &mut RequestData,
    name: &[u8],
    locator: &LocatorCell,
) -> mlua::Result<Value> {
    let string = |text: &[u8]| lua.create_string(text).map(Value::String);
    match name {
        b"remote_addr" => {
            // Formatted on the stack: `to_string` would allocate for every request.
            let mut buffer = StackText::default();
            match request.remote_addr {
                IpAddr::V4(ip) => buffer.push_ipv4(ip),
                IpAddr::V6(ip) => {
                    let _ = write!(buffer, "{ip}");
                }
            }
            string(buffer.as_bytes())
        }
        b"binary_remote_addr" => match request.remote_addr {
            IpAddr::V4(ip) => string(&ip.octets()),
            IpAddr::V6(ip) => string(&ip.octets()),
        },
        b"uri" | b"document_uri" => {
            let path = request.normalized_path();
            lua.create_string(path).map(Value::String)
        }
        b"request_uri" => string(request.request_uri().as_bytes()),
        b"host" | b"server_name" => string(request.host.as_bytes()),
        // `method` is the original Defenra agent's name for it.
        b"request_method" | b"method" => string(request.method.as_str().as_bytes()),
        b"args" | b"query_string" => match request.query() {
            Some(query) => string(query.as_bytes()),
            None => Ok(Value::Nil),
        },
        b"is_args" => string(if request.query().is_some() { b"?" } else { b"" }),
        b"scheme" => string(request.scheme.as_bytes()),
        b"https" => string(if request.scheme == "https" {
            b"on"
        } else {
            b""
        }),
        b"server_port" => string(request.server_port.to_string().as_bytes()),
        b"content_type" => header_var(lua, &request.headers, b"content-type"),
        b"content_length" => header_var(lua, &request.headers, b"content-length"),
        _ => {
            if let Some(header) = name.strip_prefix(b"http_") {
                let mut buffer = [0u8; 64];
                let mut owned = Vec::new();
                let header: &mut [u8] = match buffer.get_mut(..header.len()) {
                    Some(slot) => {
                        slot.copy_from_slice(header);
                        slot
                    }
                    None => {
                        owned.extend_from_slice(header);
                        &mut owned
                    }
                };
                for byte in header.iter_mut() {
                    *byte = if *byte == b'_' {
                        b'-'
                    } else {
                        byte.to_ascii_lowercase()
                    };
                }
                header_var(lua, &request.headers, header)
            } else if let Some(cookie) = name.strip_prefix(b"cookie_") {
                match find_cookie(&request.headers, cookie) {
                    Some(value) => string(value),
                    None => Ok(Value::Nil),
                }
            } else if let Some(arg) = name.strip_prefix(b"arg_") {
                let query = request.query().unwrap_or("");
                match find_arg(query.as_bytes(), arg) {
                    Some(value) => string(value),
                    None => Ok(Value::Nil),
                }
            } else if let Some(field) = name.strip_prefix(b"geoip_") {
                let ip = request.remote_addr;
                match request.location.field(field, ip, locator) {
                    Some(value) => string(value.as_bytes()),
                    None => Ok(Value::Nil),
                }
            } else {
                Ok(Value::Nil)
            }
        }
    }
}

/// A fixed buffer for short formatted values (an IPv6 address is at most 45 bytes).
struct StackText {
    buffer: [u8; 64],
    len: usize,
}

impl Default for StackText {
    fn default() -> Self {
        StackText {
            buffer: [0; 64],
            len: 0,
        }
    }
}

impl StackText {
    fn as_bytes(&self) -> &[u8] {
        &self.buffer[..self.len]
    }

    /// Dotted decimal, as `Ipv4Addr`'s `Display` writes it, without the formatter.
    fn push_ipv4(&mut self, ip: Ipv4Addr) {
        for (index, octet) in ip.octets().into_iter().enumerate() {
            let digits = [octet / 100, octet / 10 % 10, octet % 10];
            let skip = if octet >= 100 {
                0
            } else if octet >= 10 {
                1
            } else {
                2
            };
            let dot = [b'.'];
            let text = digits[skip..].iter().map(|digit| b'0' + digit);
            let prefix = if index == 0 { &dot[..0] } else { &dot[..] };
            for byte in prefix.iter().copied().chain(text) {
                if let Some(slot) = self.buffer.get_mut(self.len) {
                    *slot = byte;
                    self.len += 1;
                }
            }
        }
    }
}

impl std::fmt::Write for StackText {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        let end = self.len + text.len();
        let slot = self.buffer.get_mut(self.len..end).ok_or(std::fmt::Error)?;
        slot.copy_from_slice(text.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// `$http_<name>`: repeated headers joined with ", " (cookies with "; ").
fn header_var(lua: &Lua, headers: &HeaderList, name: &[u8]) -> mlua::Result<Value> {
    let mut values = headers.get_all(name);
    let Some(first) = values.next() else {
        return Ok(Value::Nil);
    };
    let separator: &[u8] = if name == b"cookie" { b"; " } else { b", " };
    let mut joined: Option<Vec<u8>> = None;
    for value in values {
        let buffer = joined.get_or_insert_with(|| first.to_vec());
        buffer.extend_from_slice(separator);
        buffer.extend_from_slice(value);
    }
    match joined {
        Some(joined) => lua.create_string(joined).map(Value::String),
        None => lua.create_string(first).map(Value::String),
    }
}

fn find_cookie<'h>(headers: &'h HeaderList, name: &[u8]) -> Option<&'h [u8]> {
    for header in headers.get_all(b"cookie") {
        for pair in header.split(|&b| b == b';') {
            let pair = pair.trim_ascii();
            let (key, value) = match pair.iter().position(|&b| b == b'=') {
                Some(at) => (&pair[..at], &pair[at + 1..]),
                None => continue,
            };
            if key.trim_ascii() == name {
                return Some(value.trim_ascii());
            }
        }
    }
    None
}

/// `$arg_<name>`: the first raw (still escaped) value, name matched case-insensitively.
fn find_arg<'a>(query: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    query.split(|&b| b == b'&').find_map(|pair| {
        let (key, value) = match pair.iter().position(|&b| b == b'=') {
            Some(at) => (&pair[..at], &pair[at + 1..]),
            None => (pair, &pair[pair.len()..]),
        };
        key.eq_ignore_ascii_case(name).then_some(value)
    })
}

/// `ngx.decode_args` / `ngx.req.get_uri_args`: `a=1&b&a=2` → `{a = {"1", "2"}, b = true}`.
fn decode_args(lua: &Lua, query: &[u8], max: usize) -> mlua::Result<MultiValue> {
    let table = lua.create_table()?;
    let mut count = 0;
    let mut truncated = false;
    for pair in query.split(|&b| b == b'&') {
        if pair.is_empty() {
            continue;
        }
        if max != 0 && count >= max {
            truncated = true;
            break;
        }
        count += 1;
        let (key, value) = match pair.iter().position(|&b| b == b'=') {
            Some(at) => (
                &pair[..at],
                Value::String(lua.create_string(unescape(&pair[at + 1..]))?),
            ),
            None => (pair, Value::Boolean(true)),
        };
        let key = unescape(key);
        if key.is_empty() {
            continue;
        }
        let key = lua.create_string(key)?;
        match table.raw_get::<Value>(&key)? {
            Value::Nil => table.raw_set(key, value)?,
            Value::Table(list) => list.raw_push(value)?,
            previous => table.raw_set(key, lua.create_sequence_from([previous, value])?)?,
        }
    }
    if truncated {
        (table, "truncated").into_lua_multi(lua)
    } else {
        (table,).into_lua_multi(lua)
    }
}

fn encode_args(args: &Table) -> mlua::Result<String> {
    let mut pairs: Vec<(Vec<u8>, Value)> = Vec::new();
    for pair in args.pairs::<Value, Value>() {
        let (key, value) = pair?;
        let key = match key {
            Value::String(key) => key.as_bytes().to_vec(),
            Value::Integer(number) => number.to_string().into_bytes(),
            Value::Number(number) => number_to_string(number).into_bytes(),
            _ => return Err(mlua::Error::runtime("ngx.encode_args: bad key type")),
        };
        pairs.push((key, value));
    }
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = String::new();
    let mut push = |key: &[u8], value: Option<&[u8]>| {
        if !out.is_empty() {
            out.push('&');
        }
        out.extend(percent_encoding::percent_encode(key, URI_COMPONENT));
        if let Some(value) = value {
            out.push('=');
            out.extend(percent_encoding::percent_encode(value, URI_COMPONENT));
        }
    };
    for (key, value) in &pairs {
        let values = match value {
            Value::Table(list) => list
                .sequence_values::<Value>()
                .collect::<mlua::Result<Vec<_>>>()?,
            other => vec![other.clone()],
        };
        for value in values {
            match value {
                Value::Boolean(true) => push(key, None),
                Value::Boolean(false) => {}
                Value::String(text) => push(key, Some(&text.as_bytes())),
                Value::Integer(number) => push(key, Some(number.to_string().as_bytes())),
                Value::Number(number) => push(key, Some(number_to_string(number).as_bytes())),
                _ => return Err(mlua::Error::runtime("ngx.encode_args: bad value type")),
            }
        }
    }
    Ok(out)
}

/// `ngx.escape_uri(s)`: everything but alphanumerics and `-._~`.
const URI_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');
/// `ngx.escape_uri(s, 0)`: only what cannot appear in a URI.
const URI: &AsciiSet = &CONTROLS.add(b' ').add(b'#').add(b'%').add(b'?');

/// `ngx.unescape_uri`: `%XX` decoded and `+` turned into a space; bad escapes kept as is.
pub(crate) fn unescape(text: &[u8]) -> Vec<u8> {
    if !text.contains(&b'+') {
        return percent_decode(text).collect();
    }
    let spaced: Vec<u8> = text
        .iter()
        .map(|&b| if b == b'+' { b' ' } else { b })
        .collect();
    percent_decode(&spaced).collect()
}

fn quote_sql(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + 2);
    out.push(b'\'');
    for &byte in text {
        match byte {
            0 => out.extend_from_slice(b"\\0"),
            b'\x08' => out.extend_from_slice(b"\\b"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x1a => out.extend_from_slice(b"\\Z"),
            b'\\' | b'\'' | b'"' => {
                out.push(b'\\');
                out.push(byte);
            }
            _ => out.push(byte),
        }
    }
    out.push(b'\'');
    out
}

/// nginx's `$uri`: percent-decoded, duplicate slashes merged, `.` and `..` resolved (never
/// above the root).
pub(crate) fn normalize_path(path: &str) -> Vec<u8> {
    let decoded: Vec<u8> = percent_decode(path.as_bytes()).collect();
    let mut segments: Vec<&[u8]> = Vec::new();
    let mut trailing_slash = false;
    for segment in decoded.split(|&b| b == b'/') {
        trailing_slash = false;
        match segment {
            b"" | b"." => trailing_slash = true,
            b".." => {
                segments.pop();
                trailing_slash = true;
            }
            _ => segments.push(segment),
        }
    }
    let mut out = Vec::with_capacity(decoded.len() + 1);
    for segment in &segments {
        out.push(b'/');
        out.extend_from_slice(segment);
    }
    if out.is_empty() || trailing_slash {
        out.push(b'/');
    }
    out
}

fn http_time(unix_secs: i64, cookie: bool) -> String {
    const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (year, month, day, hour, minute, second, weekday) = utc_parts(unix_secs);
    let month = MONTHS[(month - 1) as usize];
    let weekday = DAYS[weekday as usize];
    if cookie {
        format!(
            "{weekday}, {day:02}-{month}-{:02} {hour:02}:{minute:02}:{second:02} GMT",
            year % 100
        )
    } else {
        format!("{weekday}, {day:02} {month} {year} {hour:02}:{minute:02}:{second:02} GMT")
    }
}

/// Distinct names (and values) a state keeps parsed; later ones are parsed every time.
const HEADER_CACHE_ENTRIES: usize = 8;
/// Longest name or value kept.
const HEADER_CACHE_BYTES: usize = 256;

/// The response header names and values a state's scripts set, parsed once: most scripts
/// set the same few constant headers on every request, and parsing one copies it into a
/// new allocation (cached ones are shared by reference count). Bounded, first come first
/// kept.
#[derive(Default)]
struct HeaderCache {
    names: Vec<(Box<[u8]>, HeaderName)>,
    values: Vec<(Box<[u8]>, HeaderValue)>,
}

impl HeaderCache {
    fn name(&mut self, raw: &[u8]) -> mlua::Result<HeaderName> {
        if let Some((_, name)) = self.names.iter().find(|(key, _)| **key == *raw) {
            return Ok(name.clone());
        }
        let name = response_header_name(raw)?;
        if self.names.len() < HEADER_CACHE_ENTRIES && raw.len() <= HEADER_CACHE_BYTES {
            self.names.push((raw.into(), name.clone()));
        }
        Ok(name)
    }

    fn value(&mut self, value: &Value) -> mlua::Result<HeaderValue> {
        let Value::String(text) = value else {
            return header_value(value);
        };
        self.value_bytes(&text.as_bytes())
    }

    fn value_bytes(&mut self, raw: &[u8]) -> mlua::Result<HeaderValue> {
        if let Some((_, value)) = self.values.iter().find(|(key, _)| **key == *raw) {
            return Ok(value.clone());
        }
        let parsed = HeaderValue::from_bytes(raw)
            .map_err(|_| mlua::Error::runtime("invalid header value"))?;
        if self.values.len() < HEADER_CACHE_ENTRIES && raw.len() <= HEADER_CACHE_BYTES {
            self.values.push((raw.into(), parsed.clone()));
        }
        Ok(parsed)
    }
}

/// Whether a script may not set response header `name`: the message framing and the
/// hop-by-hop fields (RFC 9110 §7.6.1, RFC 9112 §6-7). The proxy writes its own framing for
/// the answer it sends (the WAF's page or the origin's response); a script's
/// `Content-Length` or `Transfer-Encoding` beside it would let the script frame the
/// response differently from the proxy (a second, forged response on a keep-alive
/// connection), and HTTP/2 forbids connection-specific fields outright (RFC 9113 §8.2.2).
/// nginx likewise computes these itself. Assignments to them are ignored, not errors:
/// OpenResty scripts commonly set `Content-Length` before `ngx.say`, and a script that
/// stopped there would fail open.
pub(crate) fn is_framing_header(name: &HeaderName) -> bool {
    use http::header::{CONNECTION, CONTENT_LENGTH, TE, TRAILER, TRANSFER_ENCODING, UPGRADE};
    [
        CONTENT_LENGTH,
        TRANSFER_ENCODING,
        CONNECTION,
        TE,
        TRAILER,
        UPGRADE,
    ]
    .contains(name)
        || matches!(name.as_str(), "keep-alive" | "proxy-connection")
}

/// `ngx.header[name] = value` with one value: replaces the header's values, within the cap.
/// Framing and hop-by-hop names are ignored ([`is_framing_header`]).
fn set_single(
    headers: &mut HeaderMap,
    name: HeaderName,
    value: HeaderValue,
) -> Result<(), &'static str> {
    if is_framing_header(&name) {
        return Ok(());
    }
    if headers.remove(&name).is_none() && headers.len() >= MAX_HEADERS {
        return Err("too many response headers");
    }
    headers.append(name, value);
    Ok(())
}

/// `__newindex` of `ngx.header`: `(proxy, name, value)`. A string name and a string value
/// are set here; anything else is passed to upvalue 2, the general mlua function.
#[allow(unsafe_code)]
unsafe extern "C-unwind" fn raw_header_set(state: *mut mlua::ffi::lua_State) -> std::ffi::c_int {
    use mlua::ffi;
    // SAFETY (whole function): plain stack API on the calling state; the upvalue is the
    // `Ctx` pointer `host_table` stored, valid while the state lives. Every value with a
    // destructor is gone before a Lua error is raised (it unwinds through this frame).
    unsafe {
        if ffi::lua_type(state, 2) != ffi::LUA_TSTRING
            || ffi::lua_type(state, 3) != ffi::LUA_TSTRING
        {
            let args = ffi::lua_gettop(state);
            ffi::lua_pushvalue(state, ffi::lua_upvalueindex(2));
            ffi::lua_insert(state, 1);
            ffi::lua_call(state, args, 0);
            return 0;
        }
        let outcome: Result<(), &'static std::ffi::CStr> = {
            let ctx = &*(ffi::lua_touserdata(state, ffi::lua_upvalueindex(1)) as *const Ctx);
            let bytes = |index| {
                let mut len = 0;
                let text = ffi::lua_tolstring(state, index, &mut len);
                std::slice::from_raw_parts(text.cast::<u8>(), len)
            };
            let (name, value) = (bytes(2), bytes(3));
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let (Ok(mut cache), Ok(mut response)) = (
                    ctx.header_cache.try_borrow_mut(),
                    ctx.response.try_borrow_mut(),
                ) else {
                    return Err(c"ngx.header is busy");
                };
                let name = cache.name(name).map_err(|_| c"invalid header name")?;
                let value = cache
                    .value_bytes(value)
                    .map_err(|_| c"invalid header value")?;
                set_single(&mut response.headers, name, value)
                    .map_err(|_| c"too many response headers")
            }))
            .unwrap_or(Err(c"ngx.header failed"))
        };
        if let Err(message) = outcome {
            ffi::lua_pushstring(state, message.as_ptr());
            ffi::lua_error(state);
        }
        0
    }
}

/// `c_stack_check()`: raises [`C_STACK_OVERFLOW`] when the run is too deep in C frames.
/// A raw C function: it runs on every `string.format`, so it must cost next to nothing.
#[allow(unsafe_code)]
unsafe extern "C-unwind" fn raw_c_stack_check(state: *mut mlua::ffi::lua_State) -> std::ffi::c_int {
    use mlua::ffi;
    // SAFETY: the upvalue is the `Ctx` pointer `host_table` stored, valid while the state
    // lives; nothing with a destructor is alive when the error is raised.
    unsafe {
        let ctx = &*(ffi::lua_touserdata(state, ffi::lua_upvalueindex(1)) as *const Ctx);
        if let Err(message) = ctx.check_c_stack() {
            ffi::lua_pushlstring(state, message.as_ptr().cast(), message.len());
            ffi::lua_error(state);
        }
    }
    0
}

fn response_header_name(name: &[u8]) -> mlua::Result<HeaderName> {
    let invalid = |_| mlua::Error::runtime("invalid header name");
    if !name.contains(&b'_') {
        return HeaderName::from_bytes(name).map_err(invalid);
    }
    // OpenResty turns `ngx.header.content_type` into `Content-Type`.
    let name: Vec<u8> = name
        .iter()
        .map(|&b| if b == b'_' { b'-' } else { b })
        .collect();
    HeaderName::from_bytes(&name).map_err(invalid)
}

fn header_value(value: &Value) -> mlua::Result<HeaderValue> {
    let value = match value {
        Value::String(text) => HeaderValue::from_bytes(&text.as_bytes()),
        Value::Integer(number) => HeaderValue::from_bytes(number.to_string().as_bytes()),
        Value::Number(number) => HeaderValue::from_bytes(number_to_string(*number).as_bytes()),
        _ => return Err(mlua::Error::runtime("bad header value type")),
    };
    value.map_err(|_| mlua::Error::runtime("invalid header value"))
}

/// Appends an `ngx.log` argument as [`append_value`] does, but only while `out` stays within
/// `cap` bytes; returns how many bytes were left out. A long string is cut without being
/// copied whole.
fn append_capped(out: &mut Vec<u8>, value: &Value, cap: usize) -> mlua::Result<usize> {
    let room = cap.saturating_sub(out.len());
    if let Value::String(text) = value {
        let bytes = text.as_bytes();
        let kept = bytes.len().min(room);
        out.extend_from_slice(&bytes[..kept]);
        return Ok(bytes.len() - kept);
    }
    let mut formatted = Vec::new();
    append_value(&mut formatted, value, 0)?;
    let kept = formatted.len().min(room);
    out.extend_from_slice(&formatted[..kept]);
    Ok(formatted.len() - kept)
}

/// Appends a `ngx.say` argument: strings, numbers, booleans, nil, `ngx.null`, or arrays of
/// those.
fn append_value(out: &mut Vec<u8>, value: &Value, depth: usize) -> mlua::Result<()> {
    match value {
        Value::String(text) => out.extend_from_slice(&text.as_bytes()),
        Value::Integer(number) => out.extend_from_slice(number.to_string().as_bytes()),
        Value::Number(number) => out.extend_from_slice(number_to_string(*number).as_bytes()),
        Value::Boolean(flag) => out.extend_from_slice(if *flag { b"true" } else { b"false" }),
        Value::Nil => out.extend_from_slice(b"nil"),
        Value::LightUserData(data) if data.0.is_null() => out.extend_from_slice(b"null"),
        Value::Table(list) if depth < 16 => {
            for item in list.sequence_values::<Value>() {
                append_value(out, &item?, depth + 1)?;
            }
        }
        _ => return Err(mlua::Error::runtime("bad argument type")),
    }
    if out.len() > MAX_BODY {
        return Err(mlua::Error::runtime("output too large"));
    }
    Ok(())
}

/// An integer from a Lua number (or numeric string), as `luaL_checkinteger` would take it.
fn integer(value: &Value) -> Option<i64> {
    match value {
        Value::Integer(number) => Some(*number),
        Value::Number(number) if number.fract() == 0.0 && number.abs() < 1e15 => {
            Some(*number as i64)
        }
        Value::String(text) => text.to_str().ok()?.trim().parse().ok(),
        _ => None,
    }
}

/// Formats a number the way Lua's `tostring` does (`%.14g`).
pub(crate) fn number_to_string(number: f64) -> String {
    if number.is_nan() {
        return if number.is_sign_negative() {
            "-nan"
        } else {
            "nan"
        }
        .to_owned();
    }
    if number.is_infinite() {
        return if number > 0.0 { "inf" } else { "-inf" }.to_owned();
    }
    if number.fract() == 0.0 && number.abs() < 1e15 {
        return format!("{}", number as i64);
    }
    // %.14g: 14 significant digits, scientific outside 1e-4 ..= 1e14.
    let scientific = format!("{number:.13e}");
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((&scientific, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    if !(-4..14).contains(&exponent) {
        let mantissa = trim_zeros(mantissa);
        let sign = if exponent < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", exponent.abs());
    }
    let decimals = (13 - exponent).max(0) as usize;
    trim_zeros(&format!("{number:.decimals$}")).to_owned()
}

fn trim_zeros(text: &str) -> &str {
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.')
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_decoded_and_normalised_like_nginx() {
        let cases = [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a//b/", "/a/b/"),
            ("/a/./b/../c", "/a/c"),
            ("/../../etc/passwd", "/etc/passwd"),
            ("/a%20b/%2e%2e/c", "/c"),
            ("/x/..", "/"),
        ];
        for (raw, expected) in cases {
            assert_eq!(
                String::from_utf8(normalize_path(raw)).unwrap(),
                expected,
                "{raw}"
            );
        }
    }

    #[test]
    fn ipv4_addresses_format_like_display() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "255.255.255.255",
            "192.168.100.9",
        ] {
            let ip: Ipv4Addr = ip.parse().unwrap();
            let mut text = StackText::default();
            text.push_ipv4(ip);
            assert_eq!(text.as_bytes(), ip.to_string().as_bytes());
        }
    }

    #[test]
    fn numbers_format_like_lua() {
        assert_eq!(number_to_string(1.0), "1");
        assert_eq!(number_to_string(-3.0), "-3");
        assert_eq!(number_to_string(0.5), "0.5");
        assert_eq!(number_to_string(1.0 / 3.0), "0.33333333333333");
        assert_eq!(number_to_string(1e20), "1e+20");
        assert_eq!(number_to_string(1.5e-7), "1.5e-07");
    }

    #[test]
    fn http_time_formats() {
        assert_eq!(
            http_time(1_290_079_655, false),
            "Thu, 18 Nov 2010 11:27:35 GMT"
        );
        assert_eq!(
            http_time(1_290_079_655, true),
            "Thu, 18-Nov-10 11:27:35 GMT"
        );
    }
}

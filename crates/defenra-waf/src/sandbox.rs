//! One sandboxed LuaJIT state: safe libraries only, JIT off, instruction hook (armed by the
//! watchdog for long runs), memory cap,
//! and a fresh-per-request global environment for every domain's chunk.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use mlua::{Function, HookTriggers, Lua, LuaOptions, StdLib, Table, VmState};

use crate::RequestInfo;
use crate::api::{self, Abort, Ctx, ResponseData};
use crate::clock::Clock;
use crate::dict::SharedDicts;
use crate::geo::LocatorCell;
use crate::limit::LogLimiter;
use crate::watchdog::{self, Slot, Watchdog};

/// VM instructions between two budget checks. Each check costs one `Instant::now()`, so at
/// this interval the hook adds well under 5% to a busy loop, and a runaway loop is caught
/// within a few microseconds of the budget running out.
pub(crate) const HOOK_INTERVAL: u32 = 1000;

const PRELUDE: &str = include_str!("sandbox.lua");

/// Per-run limits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) instructions: u64,
    pub(crate) time: Duration,
    pub(crate) memory: usize,
}

/// How a run ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The script returned or called `ngx.exit`; `exit` is the code it passed.
    Finished { exit: Option<i64> },
    /// A Lua error.
    Error(String),
    /// Stopped by the instruction or time budget.
    Aborted(Abort),
    /// Stopped by the memory cap.
    OutOfMemory,
}

/// A loaded script, ready to run.
pub(crate) struct Chunk {
    /// `sandbox.lua`'s runner for this chunk: resets the chunk's environment, takes the
    /// prefetched variables as arguments, then calls the chunk.
    runner: Function,
    /// The `ngx.var` names from [`PREFETCH`] the source mentions, read before each run, in
    /// the order the runner takes them.
    prefetch: Vec<&'static str>,
}

/// Variables most scripts read, handed to the script with the call that starts it when its
/// source mentions them (other names, or names built at run time, are read on first use).
const PREFETCH: &[&str] = &[
    "remote_addr",
    "uri",
    "request_uri",
    "host",
    "request_method",
    "args",
    "http_user_agent",
    "http_referer",
    "http_cookie",
    "http_x_forwarded_for",
];

/// A Lua state with the `ngx` API installed.
pub(crate) struct Sandbox {
    lua: Lua,
    ctx: Rc<Ctx>,
    /// `sandbox.lua`'s environment constructor.
    new_env: Function,
    /// `sandbox.lua`'s `make_runner(env, chunk, names)`, which makes a [`Chunk`]'s runner.
    make_runner: Function,
    /// `sandbox.lua`'s `forget_dicts()`, and the host's list of dictionary handles.
    forget_dicts: Function,
    dict_handles: api::DictHandles,
    limits: Limits,
    /// With a watchdog, the hook is off during runs until the watchdog sees one last a
    /// tick (`watchdog.rs`); without, it is on all the time.
    slot: Option<Arc<Slot>>,
}

impl Sandbox {
    /// Builds a state. Costs about a millisecond; done once per worker thread.
    pub(crate) fn new(
        limits: Limits,
        dicts: &Arc<SharedDicts>,
        clock: Clock,
        script_logs: Arc<LogLimiter>,
        watchdog: &Watchdog,
        locator: Arc<LocatorCell>,
    ) -> mlua::Result<Self> {
        let libs =
            StdLib::STRING | StdLib::TABLE | StdLib::MATH | StdLib::OS | StdLib::BIT | StdLib::JIT;
        let lua = Lua::new_with(libs, LuaOptions::new())?;
        // Count hooks never fire inside JIT-compiled traces, so a hot `while true do end`
        // would escape the budget. The interpreter alone is still fast enough here.
        lua.load("jit.off()").set_name("=jit").exec()?;
        lua.globals().raw_remove("jit")?;
        lua.set_memory_limit(limits.memory)?;

        let ctx = Rc::new(Ctx::new(clock, script_logs, limits.memory, locator));
        let hook_ctx = Rc::clone(&ctx);
        let mut slot = watchdog.register();
        let hook_slot = slot.clone();
        lua.set_hook(
            HookTriggers::new().every_nth_instruction(HOOK_INTERVAL),
            move |_, _| {
                if let Some(slot) = &hook_slot {
                    slot.fired();
                }
                match hook_ctx.tick() {
                    Ok(()) => Ok(VmState::Continue),
                    Err(Abort::Instructions) => {
                        Err(mlua::Error::runtime("waf instruction budget exceeded"))
                    }
                    Err(Abort::Time) => Err(mlua::Error::runtime("waf time budget exceeded")),
                }
            },
        )?;
        if let Some(watched) = &slot {
            // mlua's hook function (which calls the closure above) is what the watchdog
            // turns back on; until then the hook is off.
            let mut bound = false;
            // SAFETY: `state` is this Lua's main state, alive as long as `lua`; reading
            // and clearing the hook on the owning thread is ordinary API use.
            #[allow(unsafe_code)]
            unsafe {
                lua.exec_raw::<()>((), |state| {
                    if let Some(hook) = mlua::ffi::lua_gethook(state) {
                        watched.bind(state, hook, HOOK_INTERVAL as std::ffi::c_int);
                        mlua::ffi::lua_sethook(state, None, 0, 0);
                        bound = true;
                    }
                })?;
            }
            if !bound {
                slot = None;
            }
        }

        let dict_handles = api::DictHandles::default();
        let host = api::host_table(&lua, &ctx, dicts, &dict_handles)?;
        let (new_env, make_runner, forget_dicts): (Function, Function, Function) =
            lua.load(PRELUDE).set_name("=sandbox").call(host)?;
        Ok(Sandbox {
            lua,
            ctx,
            new_env,
            make_runner,
            forget_dicts,
            dict_handles,
            limits,
            slot,
        })
    }

    /// Compiles `source` into a chunk with its own environment. `Err` carries Lua's message.
    pub(crate) fn load(&self, domain: &str, source: &str) -> Result<Chunk, String> {
        let env: Table = self.new_env.call(()).map_err(|error| error.to_string())?;
        let function = self
            .lua
            .load(source)
            .set_name(format!("={domain}"))
            .set_environment(env.clone())
            .into_function()
            .map_err(|error| first_line(&error))?;
        let prefetch: Vec<&'static str> = PREFETCH
            .iter()
            .copied()
            .filter(|name| mentions(source, name))
            .collect();
        let names = self
            .lua
            .create_sequence_from(prefetch.iter().copied())
            .map_err(|error| error.to_string())?;
        let runner = self
            .make_runner
            .call((env, function, names))
            .map_err(|error| error.to_string())?;
        Ok(Chunk { runner, prefetch })
    }

    /// Runs `chunk` for `request` within the limits.
    pub(crate) fn run(&self, chunk: &Chunk, request: &RequestInfo<'_>) -> Outcome {
        let hooks = self.limits.instructions.div_ceil(u64::from(HOOK_INTERVAL));
        // Under the watchdog the first hook call comes at least a tick into the run.
        let time = match self.slot {
            Some(_) => self.limits.time.saturating_sub(watchdog::TICK),
            None => self.limits.time,
        };
        self.ctx.begin(request, hooks, time);
        let result = self
            .prefetch(chunk)
            .and_then(|[a, b, c, d, e, f, g, h, i, j]| {
                if let Some(slot) = &self.slot {
                    slot.begin();
                }
                self.ctx.stack_base.set(api::stack_address());
                // A fixed number of arguments: collecting the values would allocate each time.
                let called = chunk.runner.call::<()>((a, b, c, d, e, f, g, h, i, j));
                if let Some(slot) = &self.slot {
                    slot.end();
                }
                self.ctx.stack_base.set(0);
                called
            });
        let exit = self.ctx.exit.get();
        if exit.is_some() {
            self.collect_if_crowded();
            return Outcome::Finished { exit };
        }
        if let Some(abort) = self.ctx.abort.get() {
            // An aborted run may leave a lot of garbage behind. LuaJIT has no emergency
            // collection when an allocation hits the cap, so collect now rather than let the
            // next (innocent) script fail for lack of memory.
            self.collect_garbage();
            return Outcome::Aborted(abort);
        }
        match result {
            Ok(()) => {
                self.collect_if_crowded();
                Outcome::Finished { exit: None }
            }
            Err(error) if is_memory_error(&error) => {
                // The state stays usable once the garbage is gone.
                self.collect_garbage();
                Outcome::OutOfMemory
            }
            Err(error) => {
                self.collect_if_crowded();
                Outcome::Error(first_line(&error))
            }
        }
    }

    /// Lets go of every dictionary this state has handed out, after some were freed
    /// (`SharedDicts::retain`). The caller drops its chunks too: their runners hold the
    /// chunks' dictionary caches. The garbage collection makes the freed dictionaries'
    /// memory go now rather than at some later cycle.
    pub(crate) fn forget_dicts(&self) {
        self.dict_handles.borrow_mut().clear();
        let _ = self.forget_dicts.call::<()>(());
        self.collect_garbage();
    }

    /// The values of the chunk's prefetched variables, in order, then `nil`s.
    fn prefetch(&self, chunk: &Chunk) -> mlua::Result<[mlua::Value; PREFETCH.len()]> {
        let mut request = self.ctx.request.borrow_mut();
        let mut values = std::array::from_fn(|_| mlua::Value::Nil);
        api::unmetered(&self.lua, self.limits.memory, || {
            for (slot, name) in values.iter_mut().zip(&chunk.prefetch) {
                *slot = api::var(&self.lua, &mut request, name.as_bytes(), &self.ctx.locator)?;
            }
            Ok(values)
        })
    }

    /// A run that finishes may leave garbage too (one that caught its own memory error
    /// with `pcall`, say); without an emergency collection in LuaJIT, the next script,
    /// maybe another domain's, would fail for lack of memory. Over half the cap, collect
    /// now. Reading the counter is a load, so this costs nothing on the usual run.
    fn collect_if_crowded(&self) {
        if self.lua.used_memory() > self.limits.memory / 2 {
            self.collect_garbage();
        }
    }

    /// Two full cycles: the first may only finish a cycle that began while the data was
    /// still reachable.
    fn collect_garbage(&self) {
        let _ = self.lua.gc_collect();
        let _ = self.lua.gc_collect();
    }

    /// The response the last run built.
    pub(crate) fn response(&self) -> std::cell::RefMut<'_, ResponseData> {
        self.ctx.response.borrow_mut()
    }
}

fn is_memory_error(error: &mlua::Error) -> bool {
    match error {
        mlua::Error::MemoryError(_) => true,
        mlua::Error::CallbackError { cause, .. } => is_memory_error(cause),
        _ => false,
    }
}

/// The message without mlua's traceback, at most 300 bytes, for logs.
fn first_line(error: &mlua::Error) -> String {
    let text = match error {
        mlua::Error::CallbackError { cause, .. } => return first_line(cause),
        mlua::Error::SyntaxError { message, .. } => message.clone(),
        other => other.to_string(),
    };
    crate::prefix(text.lines().next().unwrap_or_default(), 300).to_owned()
}

/// Checks that `source` compiles, without running it. `Err` carries Lua's message.
pub(crate) fn syntax_check(lua: &Lua, domain: &str, source: &str) -> Result<(), String> {
    lua.load(source)
        .set_name(format!("={domain}"))
        .into_function()
        .map(drop)
        .map_err(|error| first_line(&error))
}

/// Whether `source` reads variable `name` as `var.name`, `var["name"]` or `var['name']`
/// (`ngx.var.uri` reads `uri`; `ngx.var.request_uri` and `local uri = ...` do not). A
/// variable read another way is still read, on first use.
fn mentions(source: &str, name: &str) -> bool {
    let is_ident = |byte: u8| byte.is_ascii_alphanumeric() || byte == b'_';
    let bytes = source.as_bytes();
    source.match_indices(name).any(|(at, _)| {
        let before = &source[..at];
        let after = &bytes[at + name.len()..];
        if before.ends_with("var.") {
            !after.first().copied().is_some_and(is_ident)
        } else if before.ends_with("var[\"") {
            after.starts_with(b"\"")
        } else if before.ends_with("var['") {
            after.starts_with(b"'")
        } else {
            false
        }
    })
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use http::Method;

    use super::*;

    fn sandbox(watchdog: &Watchdog, limits: Limits) -> Sandbox {
        Sandbox::new(
            limits,
            &Arc::new(SharedDicts::new(4, 1 << 20, Clock::system())),
            Clock::system(),
            Arc::new(LogLimiter::new(10, 1 << 20)),
            watchdog,
            Arc::new(LocatorCell::empty()),
        )
        .unwrap()
    }

    fn run(sandbox: &Sandbox, source: &str) -> Outcome {
        let chunk = sandbox.load("example.com", source).unwrap();
        let method = Method::GET;
        sandbox.run(
            &chunk,
            &RequestInfo {
                domain: "example.com",
                host: "example.com",
                method: &method,
                target: "/",
                headers: crate::RequestHeaders::Pairs(&[]),
                remote_addr: "192.0.2.1".parse().unwrap(),
                scheme: "http",
                server_port: 80,
            },
        )
    }

    fn fired(sandbox: &Sandbox) -> u64 {
        let slot = sandbox.slot.as_ref().expect("the watchdog is in use");
        slot.hook_calls()
    }

    const GENEROUS: Limits = Limits {
        instructions: u64::MAX,
        time: Duration::from_secs(5),
        memory: 64 << 20,
    };

    #[test]
    fn short_runs_have_no_hook_and_long_ones_get_it_from_the_watchdog() {
        let watchdog = Watchdog::new();
        let sandbox = sandbox(&watchdog, GENEROUS);
        // Short: a few thousand instructions, never hooked.
        for _ in 0..50 {
            let outcome = run(&sandbox, "local n = 0 for i = 1, 2000 do n = n + i end");
            assert!(
                matches!(outcome, Outcome::Finished { exit: None }),
                "{outcome:?}"
            );
        }
        assert_eq!(fired(&sandbox), 0, "a short run went through the hook");
        // Long (40 ms of the process's CPU time, so at least 20 ms here): armed after a
        // tick or two, and ends normally.
        let outcome = run(
            &sandbox,
            "local t = os.clock() while os.clock() - t < 0.04 do end",
        );
        assert!(
            matches!(outcome, Outcome::Finished { exit: None }),
            "{outcome:?}"
        );
        let after_long = fired(&sandbox);
        assert!(after_long > 0, "the watchdog never armed the long run");
        // The hook is off again for the next short run.
        let outcome = run(&sandbox, "local n = 0 for i = 1, 2000 do n = n + i end");
        assert!(
            matches!(outcome, Outcome::Finished { exit: None }),
            "{outcome:?}"
        );
        assert_eq!(fired(&sandbox), after_long);
    }

    #[test]
    fn runs_ending_as_the_watchdog_arms_leave_the_budget_working() {
        // On a thread of its own, so a budget that no longer works fails the test instead
        // of hanging it.
        let (done, outcome) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let watchdog = Watchdog::new();
            let sandbox = sandbox(
                &watchdog,
                Limits {
                    time: Duration::from_millis(30),
                    ..GENEROUS
                },
            );
            // Runs of about one tick: many end while the watchdog is arming them.
            for _ in 0..150 {
                let outcome = run(
                    &sandbox,
                    "local t = os.clock() while os.clock() - t < 0.005 do end",
                );
                assert!(
                    matches!(outcome, Outcome::Finished { exit: None }),
                    "{outcome:?}"
                );
            }
            // A runaway loop afterwards is still stopped by the time budget.
            let started = Instant::now();
            let outcome = run(&sandbox, "while true do end");
            let _ = done.send((format!("{outcome:?}"), started.elapsed()));
        });
        let (outcome, took) = outcome
            .recv_timeout(Duration::from_secs(10))
            .expect("the runaway loop was not stopped");
        assert_eq!(outcome, "Aborted(Time)");
        assert!(took < Duration::from_millis(100), "took {took:?}");
    }

    #[test]
    fn mentions_matches_variable_reads_only() {
        assert!(mentions("ngx.var.uri", "uri"));
        assert!(mentions("ngx.var[\"uri\"]", "uri"));
        assert!(!mentions("ngx.var.request_uri", "uri"));
        assert!(!mentions("ngx.var.uris", "uri"));
        assert!(mentions("local a = ngx.var.request_uri", "request_uri"));
        assert!(mentions("local v = ngx.var['uri']", "uri"));
        assert!(!mentions("local uri = string.lower(x)", "uri"));
        assert!(!mentions("ngx.var[\"uri_x\"]", "uri"));
    }
}

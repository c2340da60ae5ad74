//! `string.find`, `string.match`, `string.gmatch` and `string.gsub` over `pattern.rs`, so
//! the run budget reaches inside pattern matching.
//!
//! They are raw C functions (`lua_pushcclosure` with the request context as a light
//! userdata upvalue), as cheap to call as LuaJIT's own: rule scripts call `string.find`
//! several times per request. They follow `lib_string.c` line by line: the same argument
//! handling, results and error messages. Plain searches (a pattern without special
//! characters, or `find`'s `plain` flag) use `memchr::memmem`, linear where LuaJIT's
//! search is `memchr` plus `memcmp` at every candidate.
//!
//! Safety rules for every function here, as for the other raw functions of the crate:
//! nothing with a destructor is alive in the frame when a Lua error may be raised (a bad
//! argument, an allocation over the memory cap, an error in a `gsub` callback): those
//! unwind through the frame. The matcher, which is plain Rust, runs inside
//! `catch_unwind`, and never calls Lua.

use std::ffi::{c_char, c_int, c_void};
use std::mem::MaybeUninit;
use std::panic::{AssertUnwindSafe, catch_unwind};

use mlua::ffi;
use mlua::{Lua, Table};

use crate::api::Ctx;
use crate::pattern::{Capture, Failure, Matcher, Meter, has_specials};

/// Adds `str_find`, `str_match`, `str_gmatch` and `str_gsub` to the host table;
/// `sandbox.lua` installs them in the `string` table.
pub(crate) fn install(lua: &Lua, host: &Table, ctx: *const Ctx) -> mlua::Result<()> {
    let functions: [(&str, ffi::lua_CFunction); 4] = [
        ("str_find", raw_find),
        ("str_match", raw_match),
        ("str_gmatch", raw_gmatch),
        ("str_gsub", raw_gsub),
    ];
    for (name, function) in functions {
        // SAFETY: the light userdata points at the `Ctx` that the state's own callbacks
        // hold, so it lives as long as the state (see `api::host_table`).
        #[allow(unsafe_code)]
        let function: mlua::Function = unsafe {
            lua.exec_raw((), |state| {
                ffi::lua_pushlightuserdata(state, ctx as *mut c_void);
                ffi::lua_pushcclosure(state, function, 1);
            })?
        };
        host.raw_set(name, function)?;
    }
    Ok(())
}

/// Charges matching beyond a call's free steps to the run's budget.
struct Budget<'c>(&'c Ctx);

impl Meter for Budget<'_> {
    fn charge(&mut self, steps: u32) -> bool {
        self.0.charge(steps).is_ok()
    }
}

#[allow(unsafe_code)]
unsafe extern "C-unwind" fn raw_find(state: *mut ffi::lua_State) -> c_int {
    // SAFETY: see the module's safety rules.
    unsafe { find_aux(state, true) }
}

#[allow(unsafe_code)]
unsafe extern "C-unwind" fn raw_match(state: *mut ffi::lua_State) -> c_int {
    // SAFETY: see the module's safety rules.
    unsafe { find_aux(state, false) }
}

/// `str_find_aux` of lib_string.c.
#[allow(unsafe_code)]
unsafe fn find_aux(state: *mut ffi::lua_State, find: bool) -> c_int {
    // SAFETY (whole function): stack API on the calling state; `src` and `pat` point into
    // strings held by the stack for the whole call; the context upvalue lives as long as
    // the state.
    unsafe {
        let ctx = context(state);
        let src = check_bytes(state, 1);
        let pat = check_bytes(state, 2);
        // Optional arguments are only looked at when given: each stack access costs.
        let given = ffi::lua_gettop(state);
        let init = if given >= 3 {
            ffi::luaL_optinteger(state, 3, 1)
        } else {
            1
        };
        let start = start_index(init, src.len());
        if find && ((given >= 4 && ffi::lua_toboolean(state, 4) != 0) || !has_specials(pat)) {
            return match find_plain(&src[start..], pat) {
                Some(at) => {
                    push_position(state, start + at + 1);
                    push_position(state, start + at + pat.len());
                    2
                }
                None => {
                    ffi::lua_pushnil(state);
                    1
                }
            };
        }
        let mut matcher = Matcher::new(src, pat, Budget(ctx));
        let found = catch_unwind(AssertUnwindSafe(|| matcher.find_from(start)));
        let (start, end) = match found {
            Ok(Ok(Some(found))) => found,
            Ok(Ok(None)) => {
                ffi::lua_pushnil(state);
                return 1;
            }
            Ok(Err(failure)) => raise_failure(state, ctx, failure),
            Err(_) => raise(state, b"pattern matching failed"),
        };
        let count = matcher.capture_count(!find);
        ensure_stack(state, count + 2);
        if find {
            push_position(state, start + 1);
            push_position(state, end);
        }
        for index in 0..count {
            push_capture(state, &matcher, index, start, end);
        }
        count as c_int + if find { 2 } else { 0 }
    }
}

/// Where `needle` first occurs in `haystack`. Short subjects (a User-Agent, a path) are
/// searched directly, which costs less than setting up `memmem`'s searcher; longer ones
/// with `memmem`, in linear time.
fn find_plain(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    let Some(&first) = needle.first() else {
        return Some(0);
    };
    if haystack.len() <= 64 {
        let last_start = haystack.len().checked_sub(needle.len())?;
        return (0..=last_start)
            .find(|&at| haystack[at] == first && haystack[at..].starts_with(needle));
    }
    memchr::memmem::find(haystack, needle)
}

/// `string.gmatch(s, pattern)`: an iterator closure with upvalues (context, `s`,
/// `pattern`, next position).
#[allow(unsafe_code)]
unsafe extern "C-unwind" fn raw_gmatch(state: *mut ffi::lua_State) -> c_int {
    // SAFETY: stack API on the calling state.
    unsafe {
        check_bytes(state, 1);
        check_bytes(state, 2);
        ffi::lua_settop(state, 2);
        ffi::lua_pushvalue(state, ffi::lua_upvalueindex(1));
        ffi::lua_insert(state, 1);
        ffi::lua_pushnumber(state, 0.0);
        ffi::lua_pushcclosure(state, raw_gmatch_next, 4);
        1
    }
}

/// `gmatch_aux` of lib_string.c: the next match from the stored position on.
#[allow(unsafe_code)]
unsafe extern "C-unwind" fn raw_gmatch_next(state: *mut ffi::lua_State) -> c_int {
    // SAFETY: as `find_aux`; the subject and pattern are upvalues of this closure.
    unsafe {
        let ctx = context(state);
        let src = bytes_at(state, ffi::lua_upvalueindex(2));
        let pat = bytes_at(state, ffi::lua_upvalueindex(3));
        let position = ffi::lua_tonumber(state, ffi::lua_upvalueindex(4)) as usize;
        let mut matcher = Matcher::new(src, pat, Budget(ctx));
        let found = catch_unwind(AssertUnwindSafe(|| {
            let mut at = position;
            while at <= src.len() {
                if let Some(end) = matcher.match_at(at, 0)? {
                    return Ok(Some((at, end)));
                }
                at += 1;
            }
            Ok(None)
        }));
        let (start, end) = match found {
            Ok(Ok(Some(found))) => found,
            Ok(Ok(None)) => return 0,
            Ok(Err(failure)) => raise_failure(state, ctx, failure),
            Err(_) => raise(state, b"pattern matching failed"),
        };
        // An empty match must still move on, or the loop never ends.
        let next = if end == start { end + 1 } else { end };
        ffi::lua_pushnumber(state, next as f64);
        ffi::lua_replace(state, ffi::lua_upvalueindex(4));
        let count = matcher.capture_count(true);
        ensure_stack(state, count);
        for index in 0..count {
            push_capture(state, &matcher, index, start, end);
        }
        count as c_int
    }
}

/// `string.gsub(s, pattern, repl, n)`.
#[allow(unsafe_code)]
unsafe extern "C-unwind" fn raw_gsub(state: *mut ffi::lua_State) -> c_int {
    // SAFETY: as `find_aux`. The buffer is a `luaL_Buffer`, as in lib_string.c: its
    // pieces live on the Lua stack, so an error raised by a callback leaves nothing to free.
    unsafe {
        let ctx = context(state);
        let src = check_bytes(state, 1);
        let pat = check_bytes(state, 2);
        let replace = ffi::lua_type(state, 3);
        let max = ffi::luaL_optinteger(state, 4, src.len() as ffi::lua_Integer + 1);
        if !matches!(
            replace,
            ffi::LUA_TNUMBER | ffi::LUA_TSTRING | ffi::LUA_TFUNCTION | ffi::LUA_TTABLE
        ) {
            ffi::luaL_argerror(state, 3, c"string/function/table expected".as_ptr());
        }
        if matches!(replace, ffi::LUA_TFUNCTION | ffi::LUA_TTABLE)
            && let Err(message) = ctx.check_c_stack()
        {
            raise(state, message.as_bytes());
        }
        let anchor = pat.first() == Some(&b'^');
        let mut buffer = MaybeUninit::<ffi::luaL_Buffer>::uninit();
        let buffer = buffer.as_mut_ptr();
        ffi::luaL_buffinit(state, buffer);
        let mut matcher = Matcher::new(src, pat, Budget(ctx));
        let mut at = 0;
        let mut count: ffi::lua_Integer = 0;
        while count < max {
            let attempt = catch_unwind(AssertUnwindSafe(|| {
                matcher.match_at(at, usize::from(anchor))
            }));
            let end = match attempt {
                Ok(Ok(end)) => end,
                Ok(Err(failure)) => raise_failure(state, ctx, failure),
                Err(_) => raise(state, b"pattern matching failed"),
            };
            if let Some(end) = end {
                count += 1;
                add_value(state, buffer, &matcher, replace, at, end);
            }
            match end {
                Some(end) if end > at => at = end,
                _ if at < src.len() => {
                    ffi::luaL_addchar(buffer, src[at] as c_char);
                    at += 1;
                }
                _ => break,
            }
            if anchor {
                break;
            }
        }
        let rest = &src[at.min(src.len())..];
        ffi::luaL_addlstring(buffer, rest.as_ptr().cast(), rest.len());
        ffi::luaL_pushresult(buffer);
        ffi::lua_pushinteger(state, count);
        2
    }
}

/// Appends the replacement of the match `src[start..end]` (`add_value` of lib_string.c).
#[allow(unsafe_code)]
unsafe fn add_value(
    state: *mut ffi::lua_State,
    buffer: *mut ffi::luaL_Buffer,
    matcher: &Matcher<'_, Budget<'_>>,
    replace: c_int,
    start: usize,
    end: usize,
) {
    // SAFETY: stack API on the calling state; the buffer was initialised by `raw_gsub`.
    unsafe {
        match replace {
            ffi::LUA_TFUNCTION => {
                ffi::lua_pushvalue(state, 3);
                let count = matcher.capture_count(true);
                ensure_stack(state, count);
                for index in 0..count {
                    push_capture(state, matcher, index, start, end);
                }
                ffi::lua_call(state, count as c_int, 1);
            }
            ffi::LUA_TTABLE => {
                push_capture(state, matcher, 0, start, end);
                ffi::lua_gettable(state, 3);
            }
            _ => return add_template(state, buffer, matcher, start, end),
        }
        if ffi::lua_toboolean(state, -1) == 0 {
            // nil or false: keep the original text.
            ffi::lua_pop(state, 1);
            let whole = matcher.span(start, end - start);
            ffi::lua_pushlstring_(state, whole.as_ptr().cast(), whole.len());
        } else if ffi::lua_isstring(state, -1) == 0 {
            // Built on the Lua stack: no Rust value is alive when the error is raised.
            let kind = ffi::luaL_typename(state, -1);
            ffi::luaL_where(state, 1);
            ffi::lua_pushstring(state, c"invalid replacement value (a ".as_ptr());
            ffi::lua_pushstring(state, kind);
            ffi::lua_pushstring(state, c")".as_ptr());
            ffi::lua_concat(state, 4);
            ffi::lua_error(state);
        }
        ffi::luaL_addvalue(buffer);
    }
}

/// A string replacement: `%0`-`%9` are the match and its captures, `%x` is `x`
/// (`add_s` of lib_string.c, which also adds a NUL for a `%` at the very end).
#[allow(unsafe_code)]
unsafe fn add_template(
    state: *mut ffi::lua_State,
    buffer: *mut ffi::luaL_Buffer,
    matcher: &Matcher<'_, Budget<'_>>,
    start: usize,
    end: usize,
) {
    // SAFETY: stack API on the calling state; the template stays at index 3.
    unsafe {
        let template = bytes_at(state, 3);
        let mut index = 0;
        while index < template.len() {
            let byte = template[index];
            index += 1;
            if byte != b'%' {
                ffi::luaL_addchar(buffer, byte as c_char);
                continue;
            }
            let next = template.get(index).copied().unwrap_or(0);
            index += 1;
            match next {
                b'0' => {
                    let whole = matcher.span(start, end - start);
                    ffi::luaL_addlstring(buffer, whole.as_ptr().cast(), whole.len());
                }
                b'1'..=b'9' => {
                    push_capture(state, matcher, usize::from(next - b'1'), start, end);
                    ffi::luaL_addvalue(buffer);
                }
                other => ffi::luaL_addchar(buffer, other as c_char),
            }
        }
    }
}

/// Pushes capture `index` of the match `start..end`, raising the matcher's error for a
/// bad index (a `%3` in a replacement for a pattern with two captures).
#[allow(unsafe_code)]
unsafe fn push_capture(
    state: *mut ffi::lua_State,
    matcher: &Matcher<'_, Budget<'_>>,
    index: usize,
    start: usize,
    end: usize,
) {
    // SAFETY: stack API on the calling state.
    unsafe {
        match matcher.capture(index, start, end) {
            Ok(Capture::Span { start, len }) => {
                let text = matcher.span(start, len);
                ffi::lua_pushlstring_(state, text.as_ptr().cast(), text.len());
            }
            Ok(Capture::Position(at)) => push_position(state, at),
            Err(Failure::Pattern(message)) => raise(state, message.as_bytes()),
            Err(Failure::Budget) => raise(state, b"waf budget exceeded"),
        }
    }
}

/// The 0-based byte where a search starts: Lua's `init` is 1-based and counts from the
/// end when negative; positions before the start clamp to it, past the end to the end.
fn start_index(init: ffi::lua_Integer, len: usize) -> usize {
    let len = len as i64;
    let start = if init < 0 { init + len } else { init - 1 };
    start.clamp(0, len) as usize
}

#[allow(unsafe_code)]
unsafe fn push_position(state: *mut ffi::lua_State, position: usize) {
    // SAFETY: stack API on the calling state.
    unsafe { ffi::lua_pushnumber(state, position as f64) }
}

#[allow(unsafe_code)]
unsafe fn ensure_stack(state: *mut ffi::lua_State, extra: usize) {
    // SAFETY: stack API on the calling state.
    unsafe {
        if ffi::lua_checkstack(state, extra as c_int + 2) == 0 {
            raise(state, b"too many captures");
        }
    }
}

/// The request context: upvalue 1 of every function here.
#[allow(unsafe_code)]
unsafe fn context<'c>(state: *mut ffi::lua_State) -> &'c Ctx {
    // SAFETY: `install` and `raw_gmatch` make upvalue 1 the `Ctx` pointer, valid while the
    // state lives.
    unsafe { &*(ffi::lua_touserdata(state, ffi::lua_upvalueindex(1)) as *const Ctx) }
}

/// Argument `index` as bytes (numbers converted, as `luaL_checklstring` does); raises
/// "bad argument" otherwise. Valid while the argument stays on the stack.
#[allow(unsafe_code)]
unsafe fn check_bytes<'s>(state: *mut ffi::lua_State, index: c_int) -> &'s [u8] {
    // SAFETY: stack API on the calling state.
    unsafe {
        let mut len = 0;
        let text = ffi::luaL_checklstring(state, index, &mut len);
        std::slice::from_raw_parts(text.cast::<u8>(), len)
    }
}

/// The string at `index` (known to be one).
#[allow(unsafe_code)]
unsafe fn bytes_at<'s>(state: *mut ffi::lua_State, index: c_int) -> &'s [u8] {
    // SAFETY: stack API on the calling state.
    unsafe {
        let mut len = 0;
        let text = ffi::lua_tolstring(state, index, &mut len);
        if text.is_null() {
            return &[];
        }
        std::slice::from_raw_parts(text.cast::<u8>(), len)
    }
}

/// Raises the error for `failure`: the pattern's message, or the budget's (the run is
/// already marked aborted, so `pcall` passes it on).
#[allow(unsafe_code)]
unsafe fn raise_failure(state: *mut ffi::lua_State, ctx: &Ctx, failure: Failure) -> ! {
    // SAFETY: stack API on the calling state.
    unsafe {
        match failure {
            Failure::Pattern(message) => raise(state, message.as_bytes()),
            Failure::Budget => {
                let message: &[u8] = match ctx.abort.get() {
                    Some(crate::api::Abort::Time) => b"waf time budget exceeded",
                    _ => b"waf instruction budget exceeded",
                };
                raise(state, message)
            }
        }
    }
}

/// Raises `message` with the calling script's position in front, as `luaL_error` does.
#[allow(unsafe_code)]
unsafe fn raise(state: *mut ffi::lua_State, message: &[u8]) -> ! {
    // SAFETY: stack API on the calling state.
    unsafe {
        ffi::luaL_where(state, 1);
        ffi::lua_pushlstring_(state, message.as_ptr().cast(), message.len());
        ffi::lua_concat(state, 2);
        ffi::lua_error(state)
    }
}

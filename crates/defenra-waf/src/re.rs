//! `ngx.re.*` on the `regex` crate, with a bounded per-thread cache of compiled patterns.
//!
//! The regex crate never backtracks: a search costs at most about the pattern's NFA states
//! times the subject's bytes. PCRE-only syntax (look-around, backreferences) fails to
//! compile and the call returns `nil, err`, as OpenResty does for a bad pattern.
//!
//! That product can still be large: 10,000 `a`s searched for in 10,000 `a`s took half a
//! second, out of reach of the run's budget (one search is not interrupted). A search whose
//! worst case exceeds [`MAX_WORK`] goes through a gate first, a lazy DFA that gives up
//! instead of slowing down; when it gives up, or when groups
//! would have to be found in a match too long for the pattern, the call answers
//! `nil, err` ("regex search too costly"), as OpenResty does when PCRE's match limit is hit.

use std::cell::{Cell, RefCell};
use std::hash::Hash;
use std::rc::Rc;
use std::sync::Arc;

use mlua::{IntoLuaMulti as _, Lua, Table, Value};
use quick_cache::Equivalent;
use regex::bytes::{Captures, Regex, RegexBuilder};
use regex_automata::hybrid;
use regex_automata::nfa::thompson;
use regex_automata::util::syntax;

use crate::api::Ctx;

/// Compiled patterns expected per worker thread (sizes the cache's table).
const CACHE_CAPACITY: usize = 512;
/// Memory of the compiled patterns kept per worker thread, as [`Compiled::weight`] counts
/// it. A pattern can compile to about 2.4 MiB (and its gate as much again), so a count alone
/// let a script that cycles through distinct patterns pin gigabytes outside its Lua state.
const CACHE_BYTES: u64 = 32 << 20;
/// The least a cached pattern counts for, so that at most [`CACHE_CAPACITY`] are kept: a
/// small pattern holds more than its NFAs once searched (the regex crate's search caches),
/// and 5,000 of them kept 135 MiB more after the `waf-cpu-bombs` attack.
const MIN_WEIGHT: u64 = CACHE_BYTES / CACHE_CAPACITY as u64;
/// Compiled-program size cap per pattern, so one pattern cannot take much memory.
const SIZE_LIMIT: usize = 2 << 20;
/// Longest pattern compiled. Parsing and translating a pattern takes memory and time in
/// proportion to its length before `SIZE_LIMIT` can refuse it: a 10 MB pattern made of
/// `string.rep` took 1 GB and 2 s of one worker (found by the `waf_ngx` fuzz target).
/// The longest rules of the OWASP Core Rule Set are a few KiB.
const MAX_PATTERN: usize = 32 * 1024;
/// Bytes of a pattern quoted in a compile error.
const QUOTED: usize = 200;
/// Largest worst case, NFA states times subject bytes, searched without the gate. The regex
/// crate's worst case costs 1.5 to 5.5 ns per unit here (a lazy DFA making a state per byte,
/// or its fallback, the PikeVM), so about 50 ms: the default time budget of a whole run.
const MAX_WORK: usize = 10_000_000;
/// The gate's DFA cache, cleared when full. The gate gives up as the regex crate's lazy DFA
/// does before it falls back to the slow engine: after 3 clears, when it made a state for
/// fewer than 10 bytes. The 10,000 `a`s make it give up in 38 ms; an alternation of 2,000
/// words answers in 20 µs on 8 KB and in 6 ms on 200 KB of near misses, which filled the
/// cache (a gate that gave up at the first clear refused it).
const GATE_CACHE: usize = 1 << 20;

const CASELESS: u16 = 1;
const MULTILINE: u16 = 1 << 1;
const DOTALL: u16 = 1 << 2;
const EXTENDED: u16 = 1 << 3;
const UNICODE: u16 = 1 << 4;
const ANCHORED: u16 = 1 << 5;
const UNGREEDY: u16 = 1 << 6;

/// Compiled patterns keyed by `(pattern, flags)`; the least useful are evicted when full.
pub(crate) struct RegexCache {
    cache: quick_cache::unsync::Cache<Key, Compiled, ByMemory>,
}

/// Weighs a cached pattern by [`Compiled::weight`].
#[derive(Clone)]
struct ByMemory;

impl quick_cache::Weighter<Key, Compiled> for ByMemory {
    fn weight(&self, _key: &Key, compiled: &Compiled) -> u64 {
        compiled.weight
    }
}

/// A compiled pattern: the regex, and for the cost gate its NFA's size and a lazy DFA.
#[derive(Clone)]
pub(crate) struct Compiled {
    regex: Regex,
    states: usize,
    gate: Arc<hybrid::regex::Regex>,
    /// Bytes it holds, estimated: the gate's NFAs twice (the regex builds the same ones) and
    /// the key, at least [`MIN_WEIGHT`].
    weight: u64,
}

#[derive(Hash, PartialEq, Eq)]
struct Key {
    pattern: Box<[u8]>,
    flags: u16,
}

/// A borrowed [`Key`], so a cache hit allocates nothing. Hashes exactly like `Key`.
#[derive(Hash)]
struct KeyRef<'a> {
    pattern: &'a [u8],
    flags: u16,
}

impl Equivalent<Key> for KeyRef<'_> {
    fn equivalent(&self, key: &Key) -> bool {
        self.flags == key.flags && *self.pattern == *key.pattern
    }
}

impl RegexCache {
    pub(crate) fn new() -> Self {
        RegexCache {
            cache: quick_cache::unsync::Cache::with_weighter(CACHE_CAPACITY, CACHE_BYTES, ByMemory),
        }
    }

    /// The compiled `pattern` under OpenResty `options` (`"ijo"`), or an error message.
    pub(crate) fn compile(&mut self, pattern: &[u8], options: &[u8]) -> Result<Compiled, String> {
        let flags = parse_flags(options)?;
        if pattern.len() > MAX_PATTERN {
            return Err(format!(
                "failed to compile regex: pattern of {} bytes is too long (at most {MAX_PATTERN})",
                pattern.len()
            ));
        }
        let key = KeyRef { pattern, flags };
        if let Some(regex) = self.cache.get(&key) {
            return Ok(regex.clone());
        }
        let text = std::str::from_utf8(pattern)
            .map_err(|_| "failed to compile regex: pattern is not UTF-8".to_owned())?;
        let anchored;
        let text = if flags & ANCHORED != 0 {
            anchored = format!(r"\A(?:{text})");
            anchored.as_str()
        } else {
            text
        };
        let regex = RegexBuilder::new(text)
            .case_insensitive(flags & CASELESS != 0)
            .multi_line(flags & MULTILINE != 0)
            .dot_matches_new_line(flags & DOTALL != 0)
            .ignore_whitespace(flags & EXTENDED != 0)
            .unicode(flags & UNICODE != 0)
            .swap_greed(flags & UNGREEDY != 0)
            .size_limit(SIZE_LIMIT)
            .build()
            .map_err(|error| {
                if text.len() <= QUOTED {
                    return format!("failed to compile regex \"{text}\": {error}");
                }
                let quoted = crate::prefix(text, QUOTED);
                match error {
                    // The crate's message quotes the whole pattern, with a caret line.
                    regex::Error::Syntax(_) => {
                        format!("failed to compile regex \"{quoted}...\": syntax error")
                    }
                    error => format!("failed to compile regex \"{quoted}...\": {error}"),
                }
            })?;
        let gate = gate(text, flags).map_err(|error| {
            let quoted = crate::prefix(text, QUOTED);
            format!("failed to compile regex \"{quoted}\": {error}")
        })?;
        let nfas =
            gate.forward().get_nfa().memory_usage() + gate.reverse().get_nfa().memory_usage();
        let compiled = Compiled {
            regex,
            states: gate.forward().get_nfa().states().len(),
            gate: Arc::new(gate),
            weight: ((2 * nfas + pattern.len()) as u64).max(MIN_WEIGHT),
        };
        self.cache.insert(
            Key {
                pattern: pattern.into(),
                flags,
            },
            compiled.clone(),
        );
        Ok(compiled)
    }
}

/// The gate of `text`: a lazy DFA under the same flags as the regex, which gives up instead
/// of slowing down (see [`GATE_CACHE`]).
fn gate(text: &str, flags: u16) -> Result<hybrid::regex::Regex, String> {
    hybrid::regex::Regex::builder()
        .syntax(
            syntax::Config::new()
                .case_insensitive(flags & CASELESS != 0)
                .multi_line(flags & MULTILINE != 0)
                .dot_matches_new_line(flags & DOTALL != 0)
                .ignore_whitespace(flags & EXTENDED != 0)
                .unicode(flags & UNICODE != 0)
                .swap_greed(flags & UNGREEDY != 0)
                .utf8(false),
        )
        .thompson(
            thompson::Config::new()
                .utf8(false)
                .nfa_size_limit(Some(SIZE_LIMIT))
                .which_captures(thompson::WhichCaptures::Implicit),
        )
        .dfa(
            hybrid::dfa::Config::new()
                .cache_capacity(GATE_CACHE)
                .skip_cache_capacity_check(true)
                .minimum_cache_clear_count(Some(3))
                .minimum_bytes_per_state(Some(10))
                .unicode_word_boundary(true),
        )
        .build(text)
        .map_err(|error| error.to_string())
}

/// Searches one pattern, keeping the gate's DFA cache between the searches of one call.
struct Searcher {
    compiled: Compiled,
    cache: Option<hybrid::regex::Cache>,
}

impl Searcher {
    fn new(compiled: Compiled) -> Self {
        Searcher {
            compiled,
            cache: None,
        }
    }

    fn regex(&self) -> &Regex {
        &self.compiled.regex
    }

    /// The first match at or after `start` (at most `subject.len()`), with its groups;
    /// `Err` when the search would cost more than [`MAX_WORK`] allows.
    fn captures_at<'h>(
        &mut self,
        subject: &'h [u8],
        start: usize,
    ) -> Result<Option<Captures<'h>>, String> {
        let Compiled {
            regex,
            states,
            gate,
            ..
        } = &self.compiled;
        let rest = subject.len().saturating_sub(start);
        if states.saturating_mul(rest) <= MAX_WORK {
            return Ok(regex.captures_at(subject, start));
        }
        let cache = self.cache.get_or_insert_with(|| gate.create_cache());
        let input = regex_automata::Input::new(subject).range(start..);
        let found = match gate.try_search(cache, &input) {
            Ok(Some(found)) => found,
            Ok(None) => return Ok(None),
            Err(_) => return Err(too_costly(*states, rest)),
        };
        // The groups: the regex on the subject cut 4 bytes past the match, which keeps every
        // assertion at the match's end as it was (a word boundary reads one character). A
        // match that is too long for the pattern is refused.
        let end = subject.len().min(found.end() + 4);
        if states.saturating_mul(end - found.start()) > MAX_WORK {
            return Err(too_costly(*states, found.end() - found.start()));
        }
        match regex.captures_at(&subject[..end], found.start()) {
            Some(captures) if captures.get(0).map(|m| m.range()) == Some(found.range()) => {
                Ok(Some(captures))
            }
            // Cannot happen (both run the same pattern); refused rather than guessed.
            _ => Err(too_costly(*states, rest)),
        }
    }
}

fn too_costly(states: usize, bytes: usize) -> String {
    format!("regex search too costly: {states} states on {bytes} bytes")
}

/// OpenResty's option letters. Those that only tune PCRE (`j`, `o`, `d`, `D`, `J`) are
/// accepted and ignored.
fn parse_flags(options: &[u8]) -> Result<u16, String> {
    let mut flags = 0;
    for &option in options {
        flags |= match option {
            b'i' => CASELESS,
            b'm' => MULTILINE,
            b's' => DOTALL,
            b'x' => EXTENDED,
            b'u' => UNICODE,
            b'a' => ANCHORED,
            b'U' => UNGREEDY,
            b'j' | b'o' | b'd' | b'D' | b'J' => 0,
            other => return Err(format!("unknown flag \"{}\"", other as char)),
        };
    }
    Ok(flags)
}

/// Adds `re_match`, `re_find`, `re_gmatch`, `re_sub` and `re_gsub` to the host table.
pub(crate) fn install(lua: &Lua, host: &Table, ctx: &Rc<Ctx>) -> mlua::Result<()> {
    let c = Rc::clone(ctx);
    host.raw_set(
        "re_match",
        lua.create_function(
            move |lua,
                  (subject, pattern, options, pos_ctx): (
                mlua::LuaString,
                mlua::LuaString,
                Option<mlua::LuaString>,
                Option<Table>,
            )| {
                let mut searcher = match compile(&c, &pattern, options.as_ref()) {
                    Ok(searcher) => searcher,
                    Err(message) => return (Value::Nil, message).into_lua_multi(lua),
                };
                let subject = subject.as_bytes();
                let Some(start) = start_position(pos_ctx.as_ref(), subject.len())? else {
                    return (Value::Nil,).into_lua_multi(lua);
                };
                match searcher.captures_at(&subject, start) {
                    Ok(Some(captures)) => {
                        if let Some(pos_ctx) = &pos_ctx {
                            let end = captures.get(0).map_or(start, |m| m.end());
                            pos_ctx.raw_set("pos", end + 1)?;
                        }
                        (captures_table(lua, searcher.regex(), &captures)?,).into_lua_multi(lua)
                    }
                    Ok(None) => (Value::Nil,).into_lua_multi(lua),
                    Err(message) => (Value::Nil, message).into_lua_multi(lua),
                }
            },
        )?,
    )?;

    let c = Rc::clone(ctx);
    host.raw_set(
        "re_find",
        lua.create_function(
            move |lua,
                  (subject, pattern, options, pos_ctx, nth): (
                mlua::LuaString,
                mlua::LuaString,
                Option<mlua::LuaString>,
                Option<Table>,
                Option<usize>,
            )| {
                let mut searcher = match compile(&c, &pattern, options.as_ref()) {
                    Ok(searcher) => searcher,
                    Err(message) => return (Value::Nil, Value::Nil, message).into_lua_multi(lua),
                };
                let subject = subject.as_bytes();
                let Some(start) = start_position(pos_ctx.as_ref(), subject.len())? else {
                    return (Value::Nil,).into_lua_multi(lua);
                };
                let captures = match searcher.captures_at(&subject, start) {
                    Ok(Some(captures)) => captures,
                    Ok(None) => return (Value::Nil,).into_lua_multi(lua),
                    Err(message) => return (Value::Nil, Value::Nil, message).into_lua_multi(lua),
                };
                if let Some(pos_ctx) = &pos_ctx {
                    let end = captures.get(0).map_or(start, |m| m.end());
                    pos_ctx.raw_set("pos", end + 1)?;
                }
                match captures.get(nth.unwrap_or(0)) {
                    // 1-based, inclusive, as string.find returns.
                    Some(found) => (found.start() + 1, found.end()).into_lua_multi(lua),
                    None => (Value::Nil,).into_lua_multi(lua),
                }
            },
        )?,
    )?;

    let c = Rc::clone(ctx);
    host.raw_set(
        "re_gmatch",
        lua.create_function(
            move |lua,
                  (subject, pattern, options): (
                mlua::LuaString,
                mlua::LuaString,
                Option<mlua::LuaString>,
            )| {
                let searcher = match compile(&c, &pattern, options.as_ref()) {
                    Ok(searcher) => RefCell::new(searcher),
                    Err(message) => return (Value::Nil, message).into_lua_multi(lua),
                };
                let subject = subject.as_bytes().to_vec();
                let position = Cell::new(Some(0usize));
                let iterator = lua.create_function(move |lua, ()| {
                    let Some(start) = position.get() else {
                        return (Value::Nil,).into_lua_multi(lua);
                    };
                    let mut searcher = searcher.borrow_mut();
                    let captures = match searcher.captures_at(&subject, start) {
                        Ok(Some(captures)) => captures,
                        Ok(None) => {
                            position.set(None);
                            return (Value::Nil,).into_lua_multi(lua);
                        }
                        Err(message) => {
                            position.set(None);
                            return (Value::Nil, message).into_lua_multi(lua);
                        }
                    };
                    let whole = captures.get(0).map_or(start..start, |m| m.range());
                    // An empty match must still move forward, or the loop never ends.
                    let next = if whole.is_empty() {
                        whole.end + 1
                    } else {
                        whole.end
                    };
                    position.set((next <= subject.len()).then_some(next));
                    (captures_table(lua, searcher.regex(), &captures)?,).into_lua_multi(lua)
                })?;
                (iterator,).into_lua_multi(lua)
            },
        )?,
    )?;

    for (name, global) in [("re_sub", false), ("re_gsub", true)] {
        let c = Rc::clone(ctx);
        host.raw_set(
            name,
            lua.create_function(
                move |lua,
                      (subject, pattern, replace, options): (
                    mlua::LuaString,
                    mlua::LuaString,
                    Value,
                    Option<mlua::LuaString>,
                )| {
                    let mut searcher = match compile(&c, &pattern, options.as_ref()) {
                        Ok(searcher) => searcher,
                        Err(message) => {
                            return (Value::Nil, Value::Nil, message).into_lua_multi(lua);
                        }
                    };
                    let template = match &replace {
                        Value::String(text) => Some(text.as_bytes().to_vec()),
                        Value::Integer(number) => Some(number.to_string().into_bytes()),
                        Value::Number(number) => {
                            Some(crate::api::number_to_string(*number).into_bytes())
                        }
                        Value::Function(_) => None,
                        _ => return Err(mlua::Error::runtime("bad replace argument")),
                    };
                    let subject = subject.as_bytes().to_vec();
                    let mut out = Vec::with_capacity(subject.len());
                    let mut last = 0;
                    let mut count = 0;
                    let mut at = 0;
                    let mut previous_end = None;
                    while at <= subject.len() {
                        let captures = match searcher.captures_at(&subject, at) {
                            Ok(Some(captures)) => captures,
                            Ok(None) => break,
                            Err(message) => {
                                return (Value::Nil, Value::Nil, message).into_lua_multi(lua);
                            }
                        };
                        let Some(whole) = captures.get(0) else {
                            break;
                        };
                        // As the regex crate's iterator does: an empty match where the
                        // previous match ended is skipped, and the search moves one byte on.
                        if whole.is_empty() && previous_end == Some(whole.end()) {
                            at = whole.end() + 1;
                            continue;
                        }
                        previous_end = Some(whole.end());
                        at = whole.end();
                        out.extend_from_slice(&subject[last..whole.start()]);
                        match (&template, &replace) {
                            (Some(template), _) => {
                                if let Err(message) = expand(
                                    template,
                                    searcher.regex(),
                                    &captures,
                                    c.memory_limit,
                                    &mut out,
                                ) {
                                    return (Value::Nil, Value::Nil, message).into_lua_multi(lua);
                                }
                            }
                            (None, Value::Function(function)) => {
                                // A callback nests C frames: see `api::MAX_C_STACK`.
                                c.check_c_stack().map_err(mlua::Error::runtime)?;
                                let table = captures_table(lua, searcher.regex(), &captures)?;
                                let replaced = function.call::<Value>(table).map_err(innermost)?;
                                match replaced {
                                    Value::String(text) => out.extend_from_slice(&text.as_bytes()),
                                    Value::Integer(number) => {
                                        out.extend_from_slice(number.to_string().as_bytes())
                                    }
                                    Value::Number(number) => out.extend_from_slice(
                                        crate::api::number_to_string(number).as_bytes(),
                                    ),
                                    _ => {
                                        return Err(mlua::Error::runtime(
                                            "replace function must return a string",
                                        ));
                                    }
                                }
                            }
                            (None, _) => return Err(mlua::Error::runtime("bad replace argument")),
                        }
                        too_large(&out, c.memory_limit)?;
                        last = whole.end();
                        count += 1;
                        if !global {
                            break;
                        }
                    }
                    out.extend_from_slice(&subject[last..]);
                    (lua.create_string(out)?, count).into_lua_multi(lua)
                },
            )?,
        )?;
    }
    Ok(())
}

/// The error a replacement function raised, without the callback wrappers mlua adds at each
/// level: a recursion through `ngx.re.gsub` would otherwise carry one traceback per level.
fn innermost(error: mlua::Error) -> mlua::Error {
    match error {
        mlua::Error::CallbackError { cause, .. } => innermost((*cause).clone()),
        other => other,
    }
}

fn compile(
    ctx: &Ctx,
    pattern: &mlua::LuaString,
    options: Option<&mlua::LuaString>,
) -> Result<Searcher, String> {
    let options = options
        .map(|options| options.as_bytes().to_vec())
        .unwrap_or_default();
    ctx.regexes
        .borrow_mut()
        .compile(&pattern.as_bytes(), &options)
        .map(Searcher::new)
}

/// The 0-based byte offset to search from: `ctx.pos` (1-based) when given. `None` when it
/// lies past the end of the subject.
fn start_position(pos_ctx: Option<&Table>, len: usize) -> mlua::Result<Option<usize>> {
    let Some(pos_ctx) = pos_ctx else {
        return Ok(Some(0));
    };
    let pos = pos_ctx.raw_get::<Option<f64>>("pos")?.unwrap_or(1.0);
    let start = if pos < 1.0 { 0 } else { pos as usize - 1 };
    Ok((start <= len).then_some(start))
}

/// `m[0]` is the whole match, `m[n]` the groups (`false` when a group did not take part),
/// and named groups are also keyed by name.
fn captures_table(lua: &Lua, regex: &Regex, captures: &Captures<'_>) -> mlua::Result<Table> {
    let table = lua.create_table_with_capacity(captures.len(), 0)?;
    for (index, name) in regex.capture_names().enumerate() {
        let value = match captures.get(index) {
            Some(found) => Value::String(lua.create_string(found.as_bytes())?),
            None => Value::Boolean(false),
        };
        if let Some(name) = name {
            table.raw_set(name, value.clone())?;
        }
        table.raw_set(index, value)?;
    }
    Ok(table)
}

/// A `ngx.re.sub`/`gsub` result larger than the state's memory cap could never become a
/// Lua string: stop building it in the host's memory, with the memory error Lua raises for
/// a string that outgrows the cap.
fn too_large(out: &[u8], memory_limit: usize) -> mlua::Result<()> {
    if out.len() > memory_limit {
        return Err(mlua::Error::MemoryError(
            "ngx.re: the result exceeds the memory limit".to_owned(),
        ));
    }
    Ok(())
}

/// Expands a `ngx.re.sub` template: `$0`, `$1`, `${1}`, `${name}`, and `$$` for a dollar.
/// Stops once `out` is longer than `limit` (the caller then fails with [`too_large`]).
fn expand(
    template: &[u8],
    regex: &Regex,
    captures: &Captures<'_>,
    limit: usize,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    let group = |name: &[u8]| -> Result<Option<&[u8]>, String> {
        let text = std::str::from_utf8(name).map_err(|_| "bad template".to_owned())?;
        let found = match text.parse::<usize>() {
            Ok(index) => captures.get(index),
            Err(_) => {
                if regex.capture_names().flatten().all(|known| known != text) {
                    return Err(format!("unknown variable \"{text}\" in template"));
                }
                captures.name(text)
            }
        };
        Ok(found.map(|m| m.as_bytes()))
    };
    let mut index = 0;
    while index < template.len() && out.len() <= limit {
        let byte = template[index];
        if byte != b'$' {
            out.push(byte);
            index += 1;
            continue;
        }
        match template.get(index + 1) {
            Some(b'$') => {
                out.push(b'$');
                index += 2;
            }
            Some(b'{') => {
                let rest = &template[index + 2..];
                let close = rest
                    .iter()
                    .position(|&b| b == b'}')
                    .ok_or_else(|| "bad template: missing \"}\"".to_owned())?;
                out.extend_from_slice(group(&rest[..close])?.unwrap_or_default());
                index += 3 + close;
            }
            Some(digit) if digit.is_ascii_digit() => {
                let digits = template[index + 1..]
                    .iter()
                    .take_while(|b| b.is_ascii_digit())
                    .count();
                out.extend_from_slice(
                    group(&template[index + 1..index + 1 + digits])?.unwrap_or_default(),
                );
                index += 1 + digits;
            }
            _ => return Err("bad template: lone \"$\"".to_owned()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A script cycling through distinct large patterns (`\w{40}` under `u` compiles to about
    /// 2.3 MiB, its gate as much again) pins at most the cache's budget, not 512 of them.
    #[test]
    fn cached_patterns_stay_within_their_memory_budget() {
        let mut cache = RegexCache::new();
        let mut compiled_bytes = 0;
        for i in 0..30 {
            let pattern = format!(r"\w{{40}}x{i}");
            let compiled = cache.compile(pattern.as_bytes(), b"u").unwrap();
            compiled_bytes += compiled.weight;
            let subject = format!("{}x{i}", "é".repeat(40));
            assert!(compiled.regex.is_match(subject.as_bytes()));
        }
        assert!(compiled_bytes > 3 * CACHE_BYTES, "{compiled_bytes}");
        let held: u64 = cache
            .cache
            .iter()
            .map(|(_, compiled)| compiled.weight)
            .sum();
        assert!(held <= CACHE_BYTES, "{held} bytes held");
        assert!(cache.cache.len() >= 2, "{}", cache.cache.len());
    }
}

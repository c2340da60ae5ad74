//! Lua 5.1 patterns, as LuaJIT's `lib_string.c` matches them, with every step metered.
//!
//! LuaJIT's matcher is C code that backtracks: `("^(.-)%s*(.-)%s*(.-)%s*(.-)%s*bot$")`
//! against a 400-byte User-Agent runs for minutes, and no instruction hook fires inside a
//! C function, so the run budget could not stop it. This is the same algorithm (the same
//! recursion, the same results and the same error messages, checked against LuaJIT in the
//! tests), except that it counts its steps and asks a [`Meter`] for more every
//! [`FREE_STEPS`]: the meter charges them to the run's budget and stops the match when the
//! budget is spent. `strlib.rs` puts it behind `string.find`, `match`, `gmatch` and
//! `gsub`.

/// Captures a pattern may have (`LUA_MAXCAPTURES`).
pub(crate) const MAX_CAPTURES: usize = 32;
/// Steps one call may take before the [`Meter`] is asked (and after that, between two
/// asks): about 20-50 µs of matching.
pub(crate) const FREE_STEPS: u32 = 16_384;
/// Nesting of the matcher's recursion (`LJ_MAX_XLEVEL`): "pattern too complex" past it.
const MAX_DEPTH: u32 = 200;

const CAP_UNFINISHED: isize = -1;
const CAP_POSITION: isize = -2;

/// Why a match stopped without an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// A malformed pattern or a bad capture reference, with LuaJIT's message.
    Pattern(&'static str),
    /// The [`Meter`] refused more steps: the run's budget is spent.
    Budget,
}

/// Pays for matching work beyond a call's [`FREE_STEPS`].
pub(crate) trait Meter {
    /// Charges `steps` more steps; `false` stops the match with [`Failure::Budget`].
    fn charge(&mut self, steps: u32) -> bool;
}

/// A capture as Lua returns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Capture {
    /// `src[start..start + len]`.
    Span { start: usize, len: usize },
    /// A position capture `()`: the 1-based position.
    Position(usize),
}

/// One subject and one pattern; reused for every attempt of a `find` or `gsub` loop.
pub(crate) struct Matcher<'a, M> {
    src: &'a [u8],
    /// The pattern up to its first NUL: LuaJIT reads patterns as C strings.
    pat: &'a [u8],
    /// Captures opened so far (finished or not).
    level: usize,
    /// `(start, len)`, `len` being [`CAP_UNFINISHED`] or [`CAP_POSITION`] when not a span.
    capture: [(usize, isize); MAX_CAPTURES],
    depth: u32,
    fuel: u32,
    meter: M,
}

impl<'a, M: Meter> Matcher<'a, M> {
    pub(crate) fn new(src: &'a [u8], pat: &'a [u8], meter: M) -> Self {
        let pat = match memchr::memchr(0, pat) {
            Some(end) => &pat[..end],
            None => pat,
        };
        Matcher {
            src,
            pat,
            level: 0,
            capture: [(0, 0); MAX_CAPTURES],
            depth: 0,
            fuel: FREE_STEPS,
            meter,
        }
    }

    /// Whether the pattern starts with `^` (`find`, `match` and `gsub` anchor on it;
    /// `gmatch` does not).
    pub(crate) fn anchored(&self) -> bool {
        self.pat.first() == Some(&b'^')
    }

    /// Tries the pattern (from byte `pattern_start`: 1 to skip a `^`) at `src[start..]`;
    /// the end of the match when it matches there.
    ///
    /// # Errors
    ///
    /// A malformed pattern, or the budget.
    pub(crate) fn match_at(
        &mut self,
        start: usize,
        pattern_start: usize,
    ) -> Result<Option<usize>, Failure> {
        self.level = 0;
        self.depth = 0;
        self.do_match(start, pattern_start)
    }

    /// The first match at or after `start` (only at `start` when anchored): `(start, end)`.
    ///
    /// # Errors
    ///
    /// As [`Matcher::match_at`].
    pub(crate) fn find_from(&mut self, start: usize) -> Result<Option<(usize, usize)>, Failure> {
        let anchor = self.anchored();
        let pattern_start = usize::from(anchor);
        let mut at = start.min(self.src.len());
        if anchor {
            return Ok(self.match_at(at, pattern_start)?.map(|end| (at, end)));
        }
        // A pattern that must start with one given byte (`union%s+select`, `%.%./`) can
        // only match where that byte is: skip to those places (LuaJIT tries every one).
        let first = self.first_byte();
        loop {
            if let Some(byte) = first {
                match memchr::memchr(byte, &self.src[at..]) {
                    Some(skip) => at += skip,
                    None => return Ok(None),
                }
            }
            if let Some(end) = self.match_at(at, pattern_start)? {
                return Ok(Some((at, end)));
            }
            if at >= self.src.len() {
                return Ok(None);
            }
            at += 1;
            self.step()?;
        }
    }

    /// The byte every match starts with, when the pattern (unanchored) begins with a
    /// literal that is not optional: a plain character or `%` and a non-alphanumeric one.
    fn first_byte(&self) -> Option<u8> {
        let (byte, next) = match self.p(0) {
            b'%' if !self.p(1).is_ascii_alphanumeric() && self.pat.len() > 1 => {
                (self.p(1), self.p(2))
            }
            byte if !b"^$*+?.([%-)".contains(&byte) && !self.pat.is_empty() => (byte, self.p(1)),
            _ => return None,
        };
        (!matches!(next, b'*' | b'?' | b'-')).then_some(byte)
    }

    /// How many values `push_captures` returns for the last match: its captures, or the
    /// whole match when it has none and `whole` (`match`, `gmatch`, `gsub`; not `find`).
    pub(crate) fn capture_count(&self, whole: bool) -> usize {
        if self.level == 0 && whole {
            1
        } else {
            self.level
        }
    }

    /// Capture `index` (0-based) of the last match `src[start..end]`; capture 0 of a
    /// pattern without captures is the whole match.
    ///
    /// # Errors
    ///
    /// "invalid capture index", "unfinished capture".
    pub(crate) fn capture(
        &self,
        index: usize,
        start: usize,
        end: usize,
    ) -> Result<Capture, Failure> {
        if index >= self.level {
            return if index == 0 {
                Ok(Capture::Span {
                    start,
                    len: end - start,
                })
            } else {
                Err(Failure::Pattern("invalid capture index"))
            };
        }
        match self.capture[index] {
            (_, CAP_UNFINISHED) => Err(Failure::Pattern("unfinished capture")),
            (at, CAP_POSITION) => Ok(Capture::Position(at + 1)),
            (at, len) => Ok(Capture::Span {
                start: at,
                len: len.unsigned_abs(),
            }),
        }
    }

    /// The bytes of `capture`.
    pub(crate) fn span(&self, start: usize, len: usize) -> &'a [u8] {
        self.src.get(start..start + len).unwrap_or_default()
    }

    fn step(&mut self) -> Result<(), Failure> {
        self.fuel = self.fuel.saturating_sub(1);
        if self.fuel == 0 {
            return self.refuel();
        }
        Ok(())
    }

    #[cold]
    fn refuel(&mut self) -> Result<(), Failure> {
        if self.meter.charge(FREE_STEPS) {
            self.fuel = FREE_STEPS;
            Ok(())
        } else {
            Err(Failure::Budget)
        }
    }

    /// Pattern byte `i`, 0 past the end (the C string's terminator).
    fn p(&self, i: usize) -> u8 {
        self.pat.get(i).copied().unwrap_or(0)
    }

    /// Subject byte `i`, 0 past the end (Lua strings end with a NUL too).
    fn s(&self, i: usize) -> u8 {
        self.src.get(i).copied().unwrap_or(0)
    }

    fn do_match(&mut self, s: usize, p: usize) -> Result<Option<usize>, Failure> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(Failure::Pattern("pattern too complex"));
        }
        let result = self.match_here(s, p);
        self.depth -= 1;
        result
    }

    /// `match` of lib_string.c: its `goto init` tail calls are the loop.
    fn match_here(&mut self, mut s: usize, mut p: usize) -> Result<Option<usize>, Failure> {
        loop {
            self.step()?;
            match self.p(p) {
                b'(' => {
                    return if self.p(p + 1) == b')' {
                        self.start_capture(s, p + 2, CAP_POSITION)
                    } else {
                        self.start_capture(s, p + 1, CAP_UNFINISHED)
                    };
                }
                b')' => return self.end_capture(s, p + 1),
                b'%' if self.p(p + 1) == b'b' => match self.match_balance(s, p + 2)? {
                    Some(end) => {
                        s = end;
                        p += 4;
                        continue;
                    }
                    None => return Ok(None),
                },
                b'%' if self.p(p + 1) == b'f' => {
                    p += 2;
                    if self.p(p) != b'[' {
                        return Err(Failure::Pattern("missing '[' after '%f' in pattern"));
                    }
                    let ep = self.class_end(p)?;
                    let previous = if s == 0 { 0 } else { self.s(s - 1) };
                    if self.bracket_class(previous, p, ep - 1)
                        || !self.bracket_class(self.s(s), p, ep - 1)
                    {
                        return Ok(None);
                    }
                    p = ep;
                    continue;
                }
                b'%' if self.p(p + 1).is_ascii_digit() => {
                    match self.match_capture(s, self.p(p + 1))? {
                        Some(end) => {
                            s = end;
                            p += 2;
                            continue;
                        }
                        None => return Ok(None),
                    }
                }
                _ if p >= self.pat.len() => return Ok(Some(s)),
                b'$' if p + 1 == self.pat.len() => {
                    return Ok((s == self.src.len()).then_some(s));
                }
                _ => {}
            }
            // A single-character class, possibly with a repetition suffix.
            let ep = self.class_end(p)?;
            let matched = s < self.src.len() && self.single_match(self.src[s], p, ep);
            match self.p(ep) {
                b'?' => {
                    if matched && let Some(end) = self.do_match(s + 1, ep + 1)? {
                        return Ok(Some(end));
                    }
                    p = ep + 1;
                }
                b'*' => return self.max_expand(s, p, ep),
                b'+' => {
                    return if matched {
                        self.max_expand(s + 1, p, ep)
                    } else {
                        Ok(None)
                    };
                }
                b'-' => return self.min_expand(s, p, ep),
                _ => {
                    if !matched {
                        return Ok(None);
                    }
                    s += 1;
                    p = ep;
                }
            }
        }
    }

    /// Where the class starting at `p` ends (one past it).
    fn class_end(&self, mut p: usize) -> Result<usize, Failure> {
        let first = self.p(p);
        p += 1;
        match first {
            b'%' => {
                if p >= self.pat.len() {
                    return Err(Failure::Pattern("malformed pattern (ends with '%')"));
                }
                Ok(p + 1)
            }
            b'[' => {
                if self.p(p) == b'^' {
                    p += 1;
                }
                // The first character is taken as is, so `[]]` is a set holding `]`.
                loop {
                    if p >= self.pat.len() {
                        return Err(Failure::Pattern("malformed pattern (missing ']')"));
                    }
                    let byte = self.p(p);
                    p += 1;
                    if byte == b'%' && p < self.pat.len() {
                        p += 1;
                    }
                    if self.p(p) == b']' {
                        return Ok(p + 1);
                    }
                }
            }
            _ => Ok(p),
        }
    }

    fn single_match(&self, c: u8, p: usize, ep: usize) -> bool {
        match self.p(p) {
            b'.' => true,
            b'%' => match_class(c, self.p(p + 1)),
            b'[' => self.bracket_class(c, p, ep - 1),
            literal => literal == c,
        }
    }

    /// Whether `c` is in the set `pat[p..=ec]` (`p` at `[`, `ec` at `]`).
    fn bracket_class(&self, c: u8, mut p: usize, ec: usize) -> bool {
        let mut inside = true;
        if self.p(p + 1) == b'^' {
            inside = false;
            p += 1;
        }
        loop {
            p += 1;
            if p >= ec {
                return !inside;
            }
            if self.p(p) == b'%' {
                p += 1;
                if match_class(c, self.p(p)) {
                    return inside;
                }
            } else if self.p(p + 1) == b'-' && p + 2 < ec {
                p += 2;
                if self.p(p - 2) <= c && c <= self.p(p) {
                    return inside;
                }
            } else if self.p(p) == c {
                return inside;
            }
        }
    }

    fn match_balance(&mut self, s: usize, p: usize) -> Result<Option<usize>, Failure> {
        if p + 1 >= self.pat.len() {
            return Err(Failure::Pattern("unbalanced pattern"));
        }
        let (open, close) = (self.p(p), self.p(p + 1));
        if self.s(s) != open {
            return Ok(None);
        }
        let mut depth = 1u32;
        let mut at = s + 1;
        while at < self.src.len() {
            self.step()?;
            let c = self.src[at];
            if c == close {
                depth -= 1;
                if depth == 0 {
                    return Ok(Some(at + 1));
                }
            } else if c == open {
                depth += 1;
            }
            at += 1;
        }
        Ok(None)
    }

    fn max_expand(&mut self, s: usize, p: usize, ep: usize) -> Result<Option<usize>, Failure> {
        let mut count = 0;
        while s + count < self.src.len() && self.single_match(self.src[s + count], p, ep) {
            self.step()?;
            count += 1;
        }
        loop {
            if let Some(end) = self.do_match(s + count, ep + 1)? {
                return Ok(Some(end));
            }
            if count == 0 {
                return Ok(None);
            }
            count -= 1;
        }
    }

    fn min_expand(&mut self, mut s: usize, p: usize, ep: usize) -> Result<Option<usize>, Failure> {
        loop {
            if let Some(end) = self.do_match(s, ep + 1)? {
                return Ok(Some(end));
            }
            if s < self.src.len() && self.single_match(self.src[s], p, ep) {
                s += 1;
            } else {
                return Ok(None);
            }
        }
    }

    fn start_capture(&mut self, s: usize, p: usize, what: isize) -> Result<Option<usize>, Failure> {
        let level = self.level;
        if level >= MAX_CAPTURES {
            return Err(Failure::Pattern("too many captures"));
        }
        self.capture[level] = (s, what);
        self.level = level + 1;
        let result = self.do_match(s, p)?;
        if result.is_none() {
            self.level -= 1;
        }
        Ok(result)
    }

    fn end_capture(&mut self, s: usize, p: usize) -> Result<Option<usize>, Failure> {
        let Some(open) = (0..self.level)
            .rev()
            .find(|&level| self.capture[level].1 == CAP_UNFINISHED)
        else {
            return Err(Failure::Pattern("invalid pattern capture"));
        };
        // `s` never lies before the capture's start: the matcher only moves forward.
        self.capture[open].1 = s.saturating_sub(self.capture[open].0) as isize;
        let result = self.do_match(s, p)?;
        if result.is_none() {
            self.capture[open].1 = CAP_UNFINISHED;
        }
        Ok(result)
    }

    /// `%1`-`%9`: the text of an earlier capture again.
    fn match_capture(&mut self, s: usize, digit: u8) -> Result<Option<usize>, Failure> {
        let index = usize::from(digit).wrapping_sub(usize::from(b'1'));
        if index >= self.level || self.capture[index].1 == CAP_UNFINISHED {
            return Err(Failure::Pattern("invalid capture index"));
        }
        let (start, len) = self.capture[index];
        // A position capture never matches as text (LuaJIT compares a huge length).
        let Ok(len) = usize::try_from(len) else {
            return Ok(None);
        };
        // Comparing costs about one step per 64 bytes.
        for _ in 0..len / 64 {
            self.step()?;
        }
        let rest = self.src.get(s..).unwrap_or_default();
        let earlier = self.src.get(start..start + len).unwrap_or_default();
        Ok(rest.starts_with(earlier).then_some(s + len))
    }
}

/// `%a`, `%d`, ... (upper case negates), in the C locale as LuaJIT's `lj_char` tables;
/// any other byte after `%` stands for itself.
fn match_class(c: u8, class: u8) -> bool {
    let result = match class.to_ascii_lowercase() {
        b'a' => c.is_ascii_alphabetic(),
        b'c' => c.is_ascii_control(),
        b'd' => c.is_ascii_digit(),
        b'g' => c.is_ascii_graphic(),
        b'l' => c.is_ascii_lowercase(),
        b'p' => c.is_ascii_punctuation(),
        // C's isspace: space, \t, \n, \v, \f, \r (Rust's is_ascii_whitespace lacks \v).
        b's' => matches!(c, b' ' | b'\t'..=b'\r'),
        b'u' => c.is_ascii_uppercase(),
        b'w' => c.is_ascii_alphanumeric(),
        b'x' => c.is_ascii_hexdigit(),
        b'z' => c == 0,
        _ => return class == c,
    };
    if class.is_ascii_uppercase() {
        !result
    } else {
        result
    }
}

/// Whether `pattern` needs the matcher: LuaJIT searches patterns without any of
/// `^$*+?.([%-` as plain text (`lj_str_haspattern`).
pub(crate) fn has_specials(pattern: &[u8]) -> bool {
    pattern.iter().any(|byte| {
        matches!(
            byte,
            b'^' | b'$' | b'*' | b'+' | b'?' | b'.' | b'(' | b'[' | b'%' | b'-'
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Grants up to `.0` more steps.
    struct Limited(u64);

    impl Meter for Limited {
        fn charge(&mut self, steps: u32) -> bool {
            match self.0.checked_sub(u64::from(steps)) {
                Some(left) => {
                    self.0 = left;
                    true
                }
                None => false,
            }
        }
    }

    /// `string.match(src, pat)` rendered as Lua would print the captures, tab-separated.
    fn matched(src: &str, pat: &str) -> Result<Option<String>, Failure> {
        let mut matcher = Matcher::new(src.as_bytes(), pat.as_bytes(), Limited(u64::MAX));
        let Some((start, end)) = matcher.find_from(0)? else {
            return Ok(None);
        };
        let mut out = Vec::new();
        for index in 0..matcher.capture_count(true) {
            out.push(match matcher.capture(index, start, end)? {
                Capture::Span { start, len } => {
                    String::from_utf8_lossy(matcher.span(start, len)).into_owned()
                }
                Capture::Position(at) => at.to_string(),
            });
        }
        Ok(Some(out.join("\t")))
    }

    #[test]
    fn classes_sets_repetitions_and_captures() {
        let cases = [
            ("hello world", "o w", Some("o w")),
            ("hello world", "^(%w+)", Some("hello")),
            ("key = value", "(%w+)%s*=%s*(%w+)", Some("key\tvalue")),
            ("  x", "^%s*()", Some("3")),
            ("[[x]]", "%[(.-)%]", Some("[x")),
            ("a]b", "[]]", Some("]")),
            ("abc", "[^%a]", None),
            ("f(a(b)c)d", "%b()", Some("(a(b)c)")),
            ("THE (quick) fox", "%f[%a]%a+%f[%A]", Some("THE")),
            ("abcabc", "(abc)%1", Some("abc")),
            ("x = 'y'", "(['\"])(.-)%1", Some("'\ty")),
            ("aaa", "a-b", None),
            ("aaab", "a-b", Some("aaab")),
            ("ab", "a?b?c?$", Some("ab")),
            ("a.b", "%.", Some(".")),
            ("a\0b", "%z", Some("\0")),
            ("\x0b", "%s", Some("\x0b")),
            ("end$", "d$", None),
            ("end$", "d%$$", Some("d$")),
            ("abc", "", Some("")),
        ];
        for (src, pat, expected) in cases {
            assert_eq!(
                matched(src, pat),
                Ok(expected.map(str::to_owned)),
                "{src:?} {pat:?}"
            );
        }
    }

    #[test]
    fn malformed_patterns_have_luajits_messages() {
        let cases = [
            ("%", "malformed pattern (ends with '%')"),
            ("[a", "malformed pattern (missing ']')"),
            ("(a", "unfinished capture"),
            ("a)", "invalid pattern capture"),
            ("%1", "invalid capture index"),
            ("%b(", "unbalanced pattern"),
            ("%fa", "missing '[' after '%f' in pattern"),
        ];
        for (pat, message) in cases {
            assert_eq!(
                matched("a(b", pat),
                Err(Failure::Pattern(message)),
                "{pat:?}"
            );
        }
        let deep = "a?".repeat(300);
        assert_eq!(
            matched(&"a".repeat(300), &deep),
            Err(Failure::Pattern("pattern too complex"))
        );
        let many = "()".repeat(33);
        assert_eq!(
            matched("a", &many),
            Err(Failure::Pattern("too many captures"))
        );
    }

    #[test]
    fn backtracking_stops_when_the_meter_says_so() {
        let ua = "Mozilla/5.0 ".repeat(34);
        let pat = b"^(.-)%s*(.-)%s*(.-)%s*(.-)%s*bot$";
        let mut matcher = Matcher::new(ua.as_bytes(), pat, Limited(10_000_000));
        assert_eq!(matcher.find_from(0), Err(Failure::Budget));
        // A match well within the budget needs no more steps than it takes.
        let mut matcher = Matcher::new(b"some bot", pat, Limited(0));
        assert_eq!(matcher.find_from(0), Ok(Some((0, 8))));
    }
}

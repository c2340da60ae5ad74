//! Request headers as a script sees them: copied into one reused byte buffer, names lower-cased.

use crate::RequestHeaders;

/// Above this many bytes (or entries) a request's buffers are given back after it, so one
/// huge request does not keep its memory for the life of the thread.
const KEEP_BYTES: usize = 64 << 10;
const KEEP_ENTRIES: usize = 256;

/// The headers of the current request. Filled from either [`RequestHeaders`] form without
/// a per-request allocation once the buffers have grown to the usual size.
///
/// Lookups are linear scans: a request has a handful to a few dozen headers, and comparing
/// lengths first rejects almost every entry with one comparison, which is cheaper than
/// hashing the name.
#[derive(Default)]
pub(crate) struct HeaderList {
    /// Every name (lower case) followed by its value.
    bytes: Vec<u8>,
    /// One entry per header line, in the order of the source: arrival order for pairs,
    /// the map's iteration order (values of one name together) for a map.
    entries: Vec<Entry>,
}

#[derive(Clone, Copy)]
struct Entry {
    /// `bytes[start..split]` is the name, `bytes[split..end]` the value.
    start: usize,
    split: usize,
    end: usize,
}

impl HeaderList {
    /// Replaces the contents with `headers`.
    pub(crate) fn fill(&mut self, headers: RequestHeaders<'_>) {
        if self.bytes.capacity() > KEEP_BYTES || self.entries.capacity() > KEEP_ENTRIES {
            *self = HeaderList::default();
        }
        self.bytes.clear();
        self.entries.clear();
        match headers {
            // `HeaderName`s are lower case already.
            RequestHeaders::Map(map) => {
                for (name, value) in map {
                    self.push(name.as_str().as_bytes(), value.as_bytes(), false);
                }
            }
            RequestHeaders::Pairs(pairs) => {
                for (name, value) in pairs {
                    self.push(name.as_bytes(), value, true);
                }
            }
        }
    }

    fn push(&mut self, name: &[u8], value: &[u8], lower: bool) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(name);
        if lower {
            self.bytes[start..].make_ascii_lowercase();
        }
        let split = self.bytes.len();
        self.bytes.extend_from_slice(value);
        self.entries.push(Entry {
            start,
            split,
            end: self.bytes.len(),
        });
    }

    /// `(name, value)` of every header line, names lower case.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.entries.iter().map(|entry| {
            (
                &self.bytes[entry.start..entry.split],
                &self.bytes[entry.split..entry.end],
            )
        })
    }

    /// The values of header `name` (lower case), in order.
    pub(crate) fn get_all<'s>(&'s self, name: &'s [u8]) -> impl Iterator<Item = &'s [u8]> {
        self.iter()
            .filter(move |(candidate, _)| *candidate == name)
            .map(|(_, value)| value)
    }

    /// The first value of header `name`, matched case-insensitively.
    pub(crate) fn first_ignore_case(&self, name: &[u8]) -> Option<&[u8]> {
        self.iter()
            .find(|(candidate, _)| candidate.eq_ignore_ascii_case(name))
            .map(|(_, value)| value)
    }

    /// Header names (lower case), each once, in order of first appearance, with all their
    /// values: what an `http::HeaderMap` built from the same lines would list.
    pub(crate) fn grouped(&self) -> impl Iterator<Item = (&[u8], impl Iterator<Item = &[u8]>)> {
        self.iter()
            .enumerate()
            .filter(|&(index, (name, _))| !self.iter().take(index).any(|(seen, _)| seen == name))
            .map(|(_, (name, _))| (name, self.get_all(name)))
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderMap;

    use super::*;

    fn render(list: &HeaderList) -> String {
        let mut out = Vec::new();
        for (name, values) in list.grouped() {
            let values: Vec<_> = values.map(|value| String::from_utf8_lossy(value)).collect();
            out.push(format!(
                "{}={}",
                String::from_utf8_lossy(name),
                values.join(",")
            ));
        }
        out.join(" ")
    }

    #[test]
    fn both_forms_fill_the_same_list() {
        let pairs: &[(&str, &[u8])] = &[
            ("Host", b"a.test"),
            ("X-Multi", b"one"),
            ("user-AGENT", b"ua"),
            ("x-multi", b"two"),
        ];
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                http::HeaderValue::from_bytes(value).unwrap(),
            );
        }
        let mut from_pairs = HeaderList::default();
        from_pairs.fill(RequestHeaders::Pairs(pairs));
        let mut from_map = HeaderList::default();
        from_map.fill(RequestHeaders::Map(&map));
        assert_eq!(
            render(&from_pairs),
            "host=a.test x-multi=one,two user-agent=ua"
        );
        assert_eq!(render(&from_map), render(&from_pairs));
        assert_eq!(
            from_pairs.first_ignore_case(b"User-Agent"),
            Some(&b"ua"[..])
        );
        assert_eq!(from_pairs.first_ignore_case(b"missing"), None);
        let multi: Vec<_> = from_pairs.get_all(b"x-multi").collect();
        assert_eq!(multi, [&b"one"[..], &b"two"[..]]);
    }

    #[test]
    fn refilling_replaces_the_previous_request() {
        let mut list = HeaderList::default();
        list.fill(RequestHeaders::Pairs(&[("A", b"1"), ("B", b"2")]));
        list.fill(RequestHeaders::Pairs(&[("C", b"3")]));
        assert_eq!(render(&list), "c=3");
        let big = vec![b'x'; KEEP_BYTES + 1];
        list.fill(RequestHeaders::Pairs(&[("Big", &big)]));
        list.fill(RequestHeaders::Pairs(&[("D", b"4")]));
        assert_eq!(render(&list), "d=4");
        assert!(list.bytes.capacity() <= KEEP_BYTES);
    }
}

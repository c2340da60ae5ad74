//! The chunked transfer coding (RFC 9112 §7.1) as a byte scanner: it finds where a chunked
//! body ends and which of its bytes are data, without copying anything. The proxy passes
//! chunked bodies through as they are (a keep-alive peer needs the end; the size limit
//! needs the data count) and decodes them only for HTTP/1.0 clients.

use std::ops::Range;

/// Longest chunk-size line (size, extensions) accepted.
const MAX_SIZE_LINE: usize = 4 * 1024;
/// Largest trailer section accepted.
const MAX_TRAILERS: usize = 16 * 1024;

/// Why a chunked body is malformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ChunkError {
    #[error("invalid chunk size")]
    Size,
    #[error("chunk size line too long")]
    SizeLine,
    #[error("missing CRLF after chunk data")]
    DataEnd,
    #[error("trailer section too large")]
    Trailers,
    #[error("invalid line ending")]
    LineEnd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a chunk-size line; `digits` read so far.
    Size {
        digits: u8,
    },
    /// After the size: optional whitespace, then `;` or CR.
    AfterSize,
    /// Inside the extensions, up to CR.
    Extension,
    /// CR of the size line seen.
    SizeLf,
    /// `left` data bytes of the current chunk to go.
    Data {
        left: u64,
    },
    DataCr,
    DataLf,
    /// After the last chunk: at the start of a trailer line (or of the final CRLF).
    TrailerStart,
    TrailerLine,
    TrailerLf,
    EndLf,
    Done,
}

/// Scans one chunked body across reads.
#[derive(Debug, Clone)]
pub(crate) struct ChunkedScanner {
    state: State,
    size: u64,
    line: usize,
    trailers: usize,
}

impl Default for ChunkedScanner {
    fn default() -> Self {
        ChunkedScanner {
            state: State::Size { digits: 0 },
            size: 0,
            line: 0,
            trailers: 0,
        }
    }
}

impl ChunkedScanner {
    /// Whether the body's final CRLF has been scanned.
    pub(crate) fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Scans `input`, calling `on_data` with each run of data bytes (offsets into
    /// `input`). Returns how many bytes belong to the body: all of `input`, or fewer when
    /// the body ends inside it (the rest is the next message).
    pub(crate) fn scan(
        &mut self,
        input: &[u8],
        mut on_data: impl FnMut(Range<usize>),
    ) -> Result<usize, ChunkError> {
        let mut at = 0;
        while at < input.len() {
            let byte = input[at];
            match self.state {
                State::Done => return Ok(at),
                State::Data { left } => {
                    let run = (input.len() - at).min(usize::try_from(left).unwrap_or(usize::MAX));
                    on_data(at..at + run);
                    at += run;
                    let left = left - run as u64;
                    self.state = if left == 0 {
                        State::DataCr
                    } else {
                        State::Data { left }
                    };
                    continue;
                }
                State::Size { digits } => {
                    if let Some(value) = hex(byte) {
                        if digits >= 15 {
                            return Err(ChunkError::Size);
                        }
                        self.size = (self.size << 4) | u64::from(value);
                        self.state = State::Size { digits: digits + 1 };
                    } else if digits == 0 {
                        return Err(ChunkError::Size);
                    } else {
                        self.state = State::AfterSize;
                        continue; // look at this byte again
                    }
                }
                State::AfterSize => match byte {
                    b'\r' => self.state = State::SizeLf,
                    b';' => self.state = State::Extension,
                    b' ' | b'\t' => {}
                    b'\n' => return Err(ChunkError::LineEnd),
                    _ => return Err(ChunkError::Size),
                },
                State::Extension => match byte {
                    b'\r' => self.state = State::SizeLf,
                    // Extensions are ignored (RFC 9112 §7.1.1), but bounded.
                    b'\n' | 0 => return Err(ChunkError::LineEnd),
                    _ => {}
                },
                State::SizeLf => {
                    if byte != b'\n' {
                        return Err(ChunkError::LineEnd);
                    }
                    self.line = 0;
                    let size = std::mem::take(&mut self.size);
                    self.state = if size == 0 {
                        State::TrailerStart
                    } else {
                        State::Data { left: size }
                    };
                    at += 1;
                    continue;
                }
                State::DataCr => {
                    if byte != b'\r' {
                        return Err(ChunkError::DataEnd);
                    }
                    self.state = State::DataLf;
                }
                State::DataLf => {
                    if byte != b'\n' {
                        return Err(ChunkError::DataEnd);
                    }
                    self.state = State::Size { digits: 0 };
                    self.line = 0;
                    at += 1;
                    continue;
                }
                State::TrailerStart => {
                    self.state = if byte == b'\r' {
                        State::EndLf
                    } else {
                        State::TrailerLine
                    };
                    self.count_trailer()?;
                }
                State::TrailerLine => {
                    match byte {
                        b'\r' => self.state = State::TrailerLf,
                        b'\n' => return Err(ChunkError::LineEnd),
                        _ => {}
                    }
                    self.count_trailer()?;
                }
                State::TrailerLf => {
                    if byte != b'\n' {
                        return Err(ChunkError::LineEnd);
                    }
                    self.state = State::TrailerStart;
                    self.count_trailer()?;
                }
                State::EndLf => {
                    if byte != b'\n' {
                        return Err(ChunkError::LineEnd);
                    }
                    self.state = State::Done;
                    return Ok(at + 1);
                }
            }
            // Bytes of a size line (digits and extensions) count towards its limit.
            if matches!(
                self.state,
                State::Size { .. } | State::AfterSize | State::Extension
            ) {
                self.line += 1;
                if self.line > MAX_SIZE_LINE {
                    return Err(ChunkError::SizeLine);
                }
            }
            at += 1;
        }
        Ok(at)
    }

    fn count_trailer(&mut self) -> Result<(), ChunkError> {
        self.trailers += 1;
        if self.trailers > MAX_TRAILERS {
            return Err(ChunkError::Trailers);
        }
        Ok(())
    }
}

fn hex(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scans `input` split at every `step` bytes; returns (body length, decoded data).
    fn scan_in_steps(input: &[u8], step: usize) -> Result<(usize, Vec<u8>), ChunkError> {
        let mut scanner = ChunkedScanner::default();
        let mut data = Vec::new();
        let mut offset = 0;
        while offset < input.len() && !scanner.is_done() {
            let end = (offset + step).min(input.len());
            let piece = &input[offset..end];
            let used = scanner.scan(piece, |range| data.extend_from_slice(&piece[range]))?;
            offset += used;
            if used < piece.len() {
                break;
            }
        }
        assert!(scanner.is_done(), "body not finished");
        Ok((offset, data))
    }

    #[test]
    fn finds_the_end_and_the_data_in_any_split() {
        let body = b"5\r\nhello\r\n1A;name=value\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Trailer: 1\r\n\r\nGET /next";
        let end = body.len() - b"GET /next".len();
        for step in 1..body.len() {
            let (used, data) = scan_in_steps(body, step).unwrap();
            assert_eq!(used, end, "step {step}");
            assert_eq!(data, b"helloabcdefghijklmnopqrstuvwxyz");
        }
    }

    #[test]
    fn an_empty_body_is_just_the_last_chunk() {
        let (used, data) = scan_in_steps(b"0\r\n\r\nrest", 64).unwrap();
        assert_eq!(used, 5);
        assert!(data.is_empty());
    }

    #[test]
    fn malformed_bodies_are_errors() {
        for (body, expected) in [
            (&b"x\r\n"[..], ChunkError::Size),
            (b"1 2\r\n", ChunkError::Size),
            (b"5\r\nhelloXX", ChunkError::DataEnd),
            (b"5\nhello", ChunkError::LineEnd),
            (b"10000000000000000\r\n", ChunkError::Size),
            (b"0\r\nbad\n", ChunkError::LineEnd),
        ] {
            let mut scanner = ChunkedScanner::default();
            assert_eq!(scanner.scan(body, |_| {}), Err(expected), "{body:?}");
        }
    }

    #[test]
    fn size_lines_and_trailers_are_bounded() {
        let mut line = b"1;".to_vec();
        line.extend(std::iter::repeat_n(b'a', MAX_SIZE_LINE + 1));
        let mut scanner = ChunkedScanner::default();
        assert_eq!(scanner.scan(&line, |_| {}), Err(ChunkError::SizeLine));

        let mut trailers = b"0\r\n".to_vec();
        for _ in 0..2000 {
            trailers.extend_from_slice(b"X-Trailer: 123456789\r\n");
        }
        let mut scanner = ChunkedScanner::default();
        assert_eq!(scanner.scan(&trailers, |_| {}), Err(ChunkError::Trailers));
    }

    proptest::proptest! {
        /// Any chunks, encoded and cut anywhere: the scanner finds exactly the data and
        /// the end, and bytes after the end are left alone.
        #[test]
        fn encoded_chunks_scan_back_to_their_data(
            chunks in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 1..300), 0..8),
            step in 1usize..64,
        ) {
            let mut body = Vec::new();
            let mut data = Vec::new();
            for chunk in &chunks {
                body.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                body.extend_from_slice(chunk);
                body.extend_from_slice(b"\r\n");
                data.extend_from_slice(chunk);
            }
            body.extend_from_slice(b"0\r\n\r\n");
            let end = body.len();
            body.extend_from_slice(b"NEXT");
            let (used, decoded) = scan_in_steps(&body, step).unwrap();
            proptest::prop_assert_eq!(used, end);
            proptest::prop_assert_eq!(decoded, data);
        }

        /// Random bytes never panic the scanner, and it never claims more than it got.
        #[test]
        fn random_bytes_never_panic(input in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let mut scanner = ChunkedScanner::default();
            if let Ok(used) = scanner.scan(&input, |range| assert!(range.end <= input.len())) {
                proptest::prop_assert!(used <= input.len());
            }
        }
    }
}

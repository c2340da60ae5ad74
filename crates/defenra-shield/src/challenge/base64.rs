//! Base64 without allocation: URL-safe and unpadded for tokens (RFC 4648 §5), standard and
//! padded for the hashes in a Content-Security-Policy (RFC 4648 §4).

const URL_SAFE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
const STANDARD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Characters of the unpadded encoding of `n` bytes.
pub(crate) const fn encoded_len(n: usize) -> usize {
    (n * 8).div_ceil(6)
}

/// Writes the unpadded URL-safe encoding of `input` into `out`, which must be exactly
/// `encoded_len(input.len())` long.
pub(crate) fn encode_url_safe(input: &[u8], out: &mut [u8]) {
    encode(input, out, URL_SAFE);
}

/// The padded standard encoding of `input`.
pub(crate) fn encode_standard(input: &[u8]) -> String {
    let mut out = vec![b'='; input.len().div_ceil(3) * 4];
    let unpadded = encoded_len(input.len());
    encode(input, &mut out[..unpadded], STANDARD);
    String::from_utf8(out).expect("base64 is ASCII")
}

/// Decodes the unpadded URL-safe `input` into `out`; `None` unless `input` is exactly
/// `encoded_len(out.len())` characters of the alphabet with the unused low bits zero (the
/// one canonical spelling of those bytes).
pub(crate) fn decode_url_safe(input: &[u8], out: &mut [u8]) -> Option<()> {
    if input.len() != encoded_len(out.len()) {
        return None;
    }
    let mut accumulator: u32 = 0;
    let mut bits = 0;
    let mut written = 0;
    for &char in input {
        let value = match char {
            b'A'..=b'Z' => char - b'A',
            b'a'..=b'z' => char - b'a' + 26,
            b'0'..=b'9' => char - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        accumulator = (accumulator << 6) | u32::from(value);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out[written] = (accumulator >> bits) as u8;
            written += 1;
            accumulator &= (1 << bits) - 1;
        }
    }
    (accumulator == 0).then_some(())
}

fn encode(input: &[u8], out: &mut [u8], alphabet: &[u8; 64]) {
    debug_assert_eq!(out.len(), encoded_len(input.len()));
    let mut chunks = input.chunks_exact(3);
    let mut at = 0;
    for chunk in &mut chunks {
        let group = u32::from(chunk[0]) << 16 | u32::from(chunk[1]) << 8 | u32::from(chunk[2]);
        for shift in [18, 12, 6, 0] {
            out[at] = alphabet[(group >> shift) as usize & 63];
            at += 1;
        }
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let group = u32::from(rest[0]) << 16 | rest.get(1).map_or(0, |&byte| u32::from(byte)) << 8;
        for shift in [18, 12, 6].iter().take(rest.len() + 1) {
            out[at] = alphabet[(group >> shift) as usize & 63];
            at += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url_safe(input: &[u8]) -> String {
        let mut out = vec![0; encoded_len(input.len())];
        encode_url_safe(input, &mut out);
        String::from_utf8(out).expect("ascii")
    }

    #[test]
    fn encodes_the_rfc_4648_vectors() {
        // RFC 4648 §10.
        let vectors = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (input, expected) in vectors {
            assert_eq!(encode_standard(input.as_bytes()), expected);
            assert_eq!(url_safe(input.as_bytes()), expected.trim_end_matches('='));
        }
        assert_eq!(url_safe(&[0xfb, 0xff, 0xbf]), "-_-_");
        assert_eq!(encode_standard(&[0xfb, 0xff, 0xbf]), "+/+/");
    }

    #[test]
    fn decodes_what_it_encodes_and_only_the_canonical_spelling() {
        for len in 0..50 {
            let input: Vec<u8> = (0..len).map(|n| (n * 37 + 11) as u8).collect();
            let text = url_safe(&input);
            let mut out = vec![0; len];
            assert_eq!(decode_url_safe(text.as_bytes(), &mut out), Some(()));
            assert_eq!(out, input);
        }
        let mut out = [0; 1];
        assert_eq!(decode_url_safe(b"Zg", &mut out), Some(()));
        assert_eq!(out, *b"f");
        // "Zh" carries the same byte with a non-zero unused bit.
        assert_eq!(decode_url_safe(b"Zh", &mut out), None);
        assert_eq!(decode_url_safe(b"Z", &mut out), None, "short");
        assert_eq!(decode_url_safe(b"Zg=", &mut out), None, "padding");
        assert_eq!(decode_url_safe(b"Z+", &mut out), None, "standard alphabet");
    }
}

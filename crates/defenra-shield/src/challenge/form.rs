//! The challenge page's submitted form (`application/x-www-form-urlencoded`) and the check
//! that its return address stays on the site.

use std::borrow::Cow;

/// The largest form body read; the proxy refuses a longer one before reading it.
pub const MAX_SUBMISSION_BYTES: usize = 16 * 1024;

/// Longest return address kept; a longer one sends the visitor to `/`.
const MAX_URL: usize = 8 * 1024;

/// A parsed submission: the fields the verifier needs, percent-decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submission<'a> {
    pub challenge: Cow<'a, str>,
    pub nonce: Cow<'a, str>,
    /// Where to send the visitor after a valid solution: the `url` field when
    /// [`is_safe_redirect`] accepts it, else `/`.
    pub url: Cow<'a, str>,
}

/// Why a submission could not be parsed (the proxy answers 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormError {
    #[error("challenge form larger than {MAX_SUBMISSION_BYTES} bytes")]
    TooLarge,
    #[error("challenge form without a {0} field")]
    Missing(&'static str),
    #[error("challenge form is not valid application/x-www-form-urlencoded UTF-8")]
    Malformed,
}

/// Parses the body of a challenge submission: `name=value` pairs joined by `&`, `+` for a
/// space and `%XX` escapes (the WHATWG URL standard's urlencoded parser, strictly: a bad
/// escape or invalid UTF-8 is an error, not replaced). The first `challenge`, `nonce` and
/// `url` count; other fields (`difficulty`, `engine`) are ignored. Borrows from `body`
/// unless a field holds escapes.
///
/// # Errors
///
/// [`FormError`] for a body over [`MAX_SUBMISSION_BYTES`], a missing `challenge` or `nonce`,
/// or a malformed encoding. A missing or unsafe `url` is not an error: it becomes `/`.
pub fn parse_submission(body: &[u8]) -> Result<Submission<'_>, FormError> {
    if body.len() > MAX_SUBMISSION_BYTES {
        return Err(FormError::TooLarge);
    }
    let mut challenge = None;
    let mut nonce = None;
    let mut url = None;
    for pair in body.split(|&byte| byte == b'&') {
        let (name, value) = match pair.iter().position(|&byte| byte == b'=') {
            Some(at) => (&pair[..at], &pair[at + 1..]),
            None => (pair, &[][..]),
        };
        let slot = match name {
            b"challenge" => &mut challenge,
            b"nonce" => &mut nonce,
            b"url" => &mut url,
            _ => continue,
        };
        if slot.is_none() {
            *slot = Some(decode(value).ok_or(FormError::Malformed)?);
        }
    }
    let url = url
        .filter(|url| is_safe_redirect(url))
        .unwrap_or(Cow::Borrowed("/"));
    Ok(Submission {
        challenge: challenge.ok_or(FormError::Missing("challenge"))?,
        nonce: nonce.ok_or(FormError::Missing("nonce"))?,
        url,
    })
}

/// Whether `url` may be sent back as a `Location`: a path on this site. It must start
/// with `/` but not `//` or `/\` (both mean another host to a browser, which also turns
/// `\` into `/`), and hold only visible ASCII without `\` (browsers drop tabs and newlines
/// before parsing, and a control character would break the header).
pub fn is_safe_redirect(url: &str) -> bool {
    let bytes = url.as_bytes();
    bytes.first() == Some(&b'/')
        && !matches!(bytes.get(1), Some(b'/' | b'\\'))
        && bytes.len() <= MAX_URL
        && bytes
            .iter()
            .all(|&byte| (0x21..=0x7e).contains(&byte) && byte != b'\\')
}

fn decode(value: &[u8]) -> Option<Cow<'_, str>> {
    if !value.iter().any(|&byte| byte == b'%' || byte == b'+') {
        return std::str::from_utf8(value).ok().map(Cow::Borrowed);
    }
    let mut out = Vec::with_capacity(value.len());
    let mut at = 0;
    while at < value.len() {
        match value[at] {
            b'+' => out.push(b' '),
            b'%' => {
                let high = hex(*value.get(at + 1)?)?;
                let low = hex(*value.get(at + 2)?)?;
                out.push(high << 4 | low);
                at += 2;
            }
            byte => out.push(byte),
        }
        at += 1;
    }
    String::from_utf8(out).ok().map(Cow::Owned)
}

fn hex(char: u8) -> Option<u8> {
    (char as char).to_digit(16).map(|digit| digit as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_form_a_browser_posts() {
        let body = b"challenge=AbC-_0&difficulty=16&url=%2Fshop%3Fq%3Da%2Bb%26page%3D2&nonce=123456&engine=js";
        let submission = parse_submission(body).expect("parsed");
        assert_eq!(submission.challenge, "AbC-_0");
        assert!(matches!(submission.challenge, Cow::Borrowed(_)));
        assert_eq!(submission.nonce, "123456");
        assert_eq!(submission.url, "/shop?q=a+b&page=2");
    }

    #[test]
    fn decodes_plus_and_escapes_strictly() {
        assert_eq!(decode(b"a+b%20c%C3%A9").as_deref(), Some("a b cé"));
        assert_eq!(decode(b"%2f%2F").as_deref(), Some("//"));
        assert_eq!(decode(b"100%"), None, "truncated escape");
        assert_eq!(decode(b"%4"), None);
        assert_eq!(decode(b"%zz"), None);
        assert_eq!(decode(b"%FF"), None, "not UTF-8");
        assert_eq!(decode(b"\xff"), None, "raw non-UTF-8");
    }

    #[test]
    fn missing_fields_oversized_bodies_and_bad_encodings_are_errors() {
        assert_eq!(
            parse_submission(b"nonce=1&url=/"),
            Err(FormError::Missing("challenge"))
        );
        assert_eq!(
            parse_submission(b"challenge=x&url=/"),
            Err(FormError::Missing("nonce"))
        );
        assert_eq!(parse_submission(b""), Err(FormError::Missing("challenge")));
        assert_eq!(
            parse_submission(b"challenge=%zz&nonce=1"),
            Err(FormError::Malformed)
        );
        let mut big = b"challenge=x&nonce=1&url=/".to_vec();
        big.resize(MAX_SUBMISSION_BYTES + 1, b'a');
        assert_eq!(parse_submission(&big), Err(FormError::TooLarge));
        big.truncate(MAX_SUBMISSION_BYTES);
        assert!(parse_submission(&big).is_ok(), "exactly the cap is fine");
    }

    #[test]
    fn the_first_copy_of_a_field_counts() {
        let submission =
            parse_submission(b"challenge=one&challenge=two&nonce=1&nonce=2").expect("parsed");
        assert_eq!(submission.challenge, "one");
        assert_eq!(submission.nonce, "1");
    }

    #[test]
    fn return_addresses_off_the_site_become_the_root() {
        for (url, expected) in [
            ("%2F", "/"),
            ("%2Fa%2Fb%3Fc%3D1", "/a/b?c=1"),
            ("%2F%2Fevil.example%2F", "/"),
            ("%2F%5Cevil.example", "/"),
            ("https%3A%2F%2Fevil.example%2F", "/"),
            ("evil.example", "/"),
            ("%2F%09%2Fevil.example", "/"),
            ("%2Fa%0D%0ASet-Cookie%3A+x%3D1", "/"),
            ("%2Fa%5Cb", "/"),
            ("%2F%C3%A9", "/"),
            ("", "/"),
        ] {
            let body = format!("challenge=c&nonce=1&url={url}");
            let submission = parse_submission(body.as_bytes()).expect("parsed");
            assert_eq!(submission.url, expected, "url={url}");
        }
        let submission = parse_submission(b"challenge=c&nonce=1").expect("parsed");
        assert_eq!(submission.url, "/", "no url field");
        let long = format!("/{}", "a".repeat(MAX_URL));
        assert!(!is_safe_redirect(&long));
        assert!(is_safe_redirect(&long[..MAX_URL]));
    }
}

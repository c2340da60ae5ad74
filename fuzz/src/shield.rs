//! Shield targets: the challenge page's submitted form (`shield_form`), the clearance
//! cookie scanner (`shield_cookie`), challenge and clearance tokens (`shield_token`), and
//! the CIDR parser every whitelist, trusted-proxy list and ban goes through (`cidr`). All
//! of them read bytes a client (or Core) chose.
//!
//! Checks:
//! - form: a body over the limit is refused; an accepted return address is a path on the
//!   site (a `Location` that cannot leave it or break the header); the fields read back
//!   the same when written again fully percent-encoded;
//! - cookie: values never span a `;`, and the same cookies are found whether a list comes
//!   in one `Cookie` field or split over several (HTTP/2, RFC 9113 §8.2.3);
//! - token: what the key ring issues verifies (clearances for the whole /24 or /64 until
//!   they expire, challenges when solved and until their TTL), and any other spelling of
//!   it, another host, another network, a later time or arbitrary bytes are refused;
//! - cidr: a parsed prefix prints as text that parses to the same prefix and contains
//!   its own network address; a list splits into as many results as entries.

use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::OnceLock;
use std::time::Duration;

use defenra_config::Cidr;
use defenra_shield::challenge::{
    self, CHALLENGE_TTL, Clearance, Difficulty, MAX_SUBMISSION_BYTES, Rejection,
};
use defenra_shield::{KeyRing, ShieldKey};

use crate::Input;

/// Target `shield_form`: `data` is the body of a POST to the challenge's submit path.
pub fn form(data: &[u8]) {
    let submission = match challenge::parse_submission(data) {
        Ok(submission) => submission,
        Err(_) => return,
    };
    assert!(
        data.len() <= MAX_SUBMISSION_BYTES,
        "an oversized form was read"
    );
    let url = submission.url.as_bytes();
    assert_eq!(url.first(), Some(&b'/'), "return address off the site");
    assert!(
        !matches!(url.get(1), Some(b'/' | b'\\')),
        "return address to another host"
    );
    assert!(
        url.iter().all(|&byte| (0x21..=0x7e).contains(&byte)),
        "return address with a byte that breaks a Location field"
    );

    let mut encoded = Vec::new();
    for (name, value) in [
        ("challenge", &submission.challenge),
        ("nonce", &submission.nonce),
        ("url", &submission.url),
    ] {
        if !encoded.is_empty() {
            encoded.push(b'&');
        }
        encoded.extend_from_slice(name.as_bytes());
        encoded.push(b'=');
        for byte in value.bytes() {
            encoded.extend_from_slice(format!("%{byte:02X}").as_bytes());
        }
    }
    if encoded.len() <= MAX_SUBMISSION_BYTES {
        let again = challenge::parse_submission(&encoded).expect("a re-encoded form parses");
        assert_eq!(again, submission, "fields differ after re-encoding");
        assert!(matches!(again.url, Cow::Owned(_)) || again.url == "/");
    }
}

/// Target `shield_cookie`: `data` is a cookie name, a newline, then `Cookie` field values
/// separated by newlines.
pub fn cookie(data: &[u8]) {
    let mut lines = data.split(|&byte| byte == b'\n');
    let Some(name) = lines.next().and_then(|name| std::str::from_utf8(name).ok()) else {
        return;
    };
    let fields: Vec<&[u8]> = lines.collect();
    let values: Vec<&[u8]> = challenge::cookie_values(fields.iter().copied(), name).collect();
    for value in &values {
        assert!(!value.contains(&b';'), "a cookie value spans a ';'");
    }
    let joined = fields.join(&b';');
    let from_one: Vec<&[u8]> = challenge::cookie_values([joined.as_slice()], name).collect();
    assert_eq!(values, from_one, "split and joined Cookie fields differ");

    // None of these can be a valid clearance of this (unpublished) key.
    let client = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));
    let clearance = ring().check_cookies(fields.iter().copied(), name, client, "fuzz.example", NOW);
    match clearance {
        Clearance::Missing => assert!(values.is_empty()),
        Clearance::Rejected(_) => assert!(!values.is_empty()),
        Clearance::Valid => panic!("a clearance was forged: {values:?}"),
    }
}

/// Unix second the token targets verify at.
const NOW: u64 = 1_800_000_000;

fn ring() -> &'static KeyRing {
    static RING: OnceLock<KeyRing> = OnceLock::new();
    RING.get_or_init(|| KeyRing::new(&ShieldKey::from_bytes([0x5a; 32])))
}

/// A ring that never issues anything, for the arbitrary bytes: whatever it accepts is a
/// forgery. (Offered to [`ring`], they may be a genuine token it issued in an earlier
/// run, which libFuzzer's comparison hooks hand back: found after 420,000 runs.)
fn unpublished() -> &'static KeyRing {
    static RING: OnceLock<KeyRing> = OnceLock::new();
    RING.get_or_init(|| KeyRing::new(&ShieldKey::from_bytes([0xa5; 32])))
}

/// Target `shield_token`: `data` chooses a client, a host, a time, a TTL and a difficulty,
/// then edits to the issued tokens, then arbitrary bytes offered as tokens.
pub fn token(data: &[u8]) {
    let mut input = Input::new(data);
    let client = ip(&mut input);
    let host_len = usize::from(input.u8() % 64);
    let host = String::from_utf8_lossy(input.take(host_len)).into_owned();
    let now = NOW + u64::from(input.u16());
    let ttl = Duration::from_secs(u64::from(input.u16()));
    let difficulty = Difficulty::new(u32::from(input.u8() % 5)).expect("at most 4 bits");
    let n_edits = usize::from(input.u8() % 4);
    let edits: Vec<(usize, u8)> = (0..n_edits)
        .map(|_| (usize::from(input.u8()), input.u8()))
        .collect();
    let raw = input.rest();
    let ring = ring();

    // Clearances.
    let clearance = ring.issue_clearance(client, &host, ttl, now);
    let token = clearance.as_str().as_bytes();
    let valid = ttl.as_secs() > 0;
    assert_eq!(
        ring.verify_clearance(token, client, &host, now).is_ok(),
        valid,
        "a fresh clearance"
    );
    assert_eq!(
        ring.verify_clearance(token, neighbour(client), &host, now)
            .is_ok(),
        valid,
        "a clearance for the same network"
    );
    assert_eq!(
        ring.verify_clearance(token, client, &host, now + ttl.as_secs()),
        Err(Rejection::Expired),
        "a clearance at its expiry"
    );
    assert!(
        ring.verify_clearance(token, client, &format!("{host}x"), now)
            .is_err(),
        "a clearance for another host"
    );
    assert!(
        ring.verify_clearance(token, other_network(client), &host, now)
            .is_err(),
        "a clearance for another network"
    );
    let edited = edit(token, &edits);
    if edited != token {
        assert!(
            ring.verify_clearance(&edited, client, &host, now).is_err(),
            "an edited clearance was accepted: {}",
            String::from_utf8_lossy(&edited)
        );
    }
    assert!(
        unpublished()
            .verify_clearance(raw, client, &host, now)
            .is_err(),
        "bytes never issued were accepted as a clearance"
    );

    // Challenges.
    let challenge = ring.issue_challenge(client, &host, difficulty, now);
    let text = challenge.as_str().as_bytes();
    let nonce = challenge.solve(difficulty).to_string();
    let verify = |challenge: &[u8], nonce: &[u8], client: IpAddr, host: &str, at: u64| {
        ring.verify_solution(challenge, nonce, client, host, difficulty, at)
    };
    assert_eq!(verify(text, nonce.as_bytes(), client, &host, now), Ok(()));
    assert_eq!(
        verify(
            text,
            nonce.as_bytes(),
            client,
            &host,
            now + CHALLENGE_TTL.as_secs() + 1
        ),
        Err(Rejection::Expired)
    );
    assert!(verify(text, nonce.as_bytes(), other_network(client), &host, now).is_err());
    let edited = edit(text, &edits);
    if edited != text {
        assert!(
            verify(&edited, nonce.as_bytes(), client, &host, now).is_err(),
            "an edited challenge was accepted: {}",
            String::from_utf8_lossy(&edited)
        );
    }
    let (challenge_part, nonce_part) = raw.split_at(raw.len().min(challenge::CHALLENGE_LEN));
    assert!(
        unpublished()
            .verify_solution(challenge_part, nonce_part, client, &host, difficulty, now)
            .is_err(),
        "bytes never issued were accepted as a solved challenge"
    );
    let _ = verify(text, raw, client, &host, now);
}

fn ip(input: &mut Input<'_>) -> IpAddr {
    if input.u8().is_multiple_of(2) {
        let bytes = input.take(4);
        let mut octets = [0; 4];
        octets[..bytes.len()].copy_from_slice(bytes);
        IpAddr::V4(Ipv4Addr::from(octets))
    } else {
        let bytes = input.take(16);
        let mut octets = [0; 16];
        octets[..bytes.len()].copy_from_slice(bytes);
        IpAddr::V6(Ipv6Addr::from(octets))
    }
}

/// Another address in the same /24 (IPv4) or /64 (IPv6) as `ip`.
fn neighbour(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let mut octets = v4.octets();
            octets[3] ^= 0x55;
            IpAddr::V4(Ipv4Addr::from(octets))
        }
        IpAddr::V6(v6) => {
            let mut octets = v6.octets();
            octets[15] ^= 0x55;
            IpAddr::V6(Ipv6Addr::from(octets))
        }
    }
}

/// An address outside `ip`'s /24 or /64.
fn other_network(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let mut octets = v4.octets();
            octets[2] ^= 0x01;
            IpAddr::V4(Ipv4Addr::from(octets))
        }
        IpAddr::V6(v6) => {
            let mut octets = v6.octets();
            octets[7] ^= 0x01;
            IpAddr::V6(Ipv6Addr::from(octets))
        }
    }
}

/// `token` with each `(position, byte)` edit applied: a position past the end appends,
/// byte 0 deletes.
fn edit(token: &[u8], edits: &[(usize, u8)]) -> Vec<u8> {
    let mut out = token.to_vec();
    for &(at, byte) in edits {
        if at >= out.len() {
            out.push(byte);
        } else if byte == 0 {
            out.remove(at);
        } else {
            out[at] = byte;
        }
    }
    out
}

/// Target `cidr`: `data` is a prefix or a list of prefixes as an operator writes them.
pub fn cidr(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cidr) = text.parse::<Cidr>() {
        check_cidr(cidr);
        check_membership(text, cidr);
    }
    let (good, _) = defenra_config::parse_cidr_list(text);
    for cidr in good {
        check_cidr(cidr);
    }
}

fn check_cidr(cidr: Cidr) {
    let printed = cidr.to_string();
    assert_eq!(
        printed.parse::<Cidr>(),
        Ok(cidr),
        "{printed} reads back differently"
    );
    assert!(
        cidr.contains(cidr.addr()),
        "{printed} does not contain its address"
    );
    let width = if cidr.addr().is_ipv4() { 32 } else { 128 };
    assert!(cidr.prefix() <= width);
    assert_eq!(cidr.is_host(), cidr.prefix() == width);
}

/// `contains` against prefix arithmetic on the written address: addresses that differ
/// from it only past the prefix are inside, and flipping any bit within the prefix leads
/// outside. IPv4-mapped addresses are IPv4 clients (`contains` canonicalises them), so they
/// are not probed against IPv6 prefixes; and IPv4-mapped IPv6 prefixes shorter than /96
/// are stored as IPv4 /0, which the arithmetic on 128 bits does not model.
fn check_membership(text: &str, cidr: Cidr) {
    let text = text.trim();
    let (addr, prefix) = match text.split_once('/') {
        Some((addr, prefix)) => (addr.trim(), prefix.trim().parse::<u32>().ok()),
        None => (text, None),
    };
    let Ok(written) = addr.parse::<IpAddr>() else {
        panic!("{text:?} parsed as a prefix but its address does not parse");
    };
    let (bits, width) = match written {
        IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32),
        IpAddr::V6(v6) => (u128::from(v6), 128),
    };
    let prefix = prefix.unwrap_or(width);
    if matches!(written, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some()) && prefix < 96 {
        return;
    }
    let to_ip = |bits: u128| match written {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(bits as u32)),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(bits)),
    };
    for bit in 0..width {
        // Bit 0 is the most significant.
        let flipped = to_ip(bits ^ (1u128 << (width - 1 - bit)));
        if cidr.addr().is_ipv6()
            && matches!(flipped, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some())
        {
            // An IPv4-mapped address is an IPv4 client, by design never in an IPv6 prefix.
            continue;
        }
        assert_eq!(
            cidr.contains(flipped),
            bit >= prefix,
            "{text:?} ({cidr}) and {flipped}"
        );
    }
}

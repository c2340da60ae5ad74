//! The browser challenge's building blocks: the shield key and its rotation, the signed
//! challenge string and its proof of work, the clearance cookie, and the submitted form.
//!
//! Everything here is stateless: a challenge or a clearance carries its own issue time or
//! expiry and an HMAC-SHA256 tag over the client address and host it was made for, so any
//! agent holding the same [`ShieldKey`] accepts what another issued, and nothing is stored
//! per visitor. Verification costs one HMAC (a clearance) or one HMAC and one SHA-256 (a
//! solution); cheap checks (length, key id, address binding, time) run first so junk is
//! refused before any hashing. docs/shield.md, "Browser challenge", has the formats.
//!
//! Times are Unix seconds passed in by the caller ([`unix_now`] reads the system clock), so
//! tests run on any clock and a fleet agrees on expiries.

pub(crate) mod base64;
mod cookie;
mod form;
mod key;
mod token;

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use cookie::{Clearance, CookieValues, Scheme, cookie_values, set_cookie};
pub use form::{FormError, MAX_SUBMISSION_BYTES, Submission, is_safe_redirect, parse_submission};
pub use key::{Fingerprint, KeyFileError, KeyRing, ShieldKey};
pub(crate) use token::decimal;
pub use token::{CHALLENGE_LEN, CLEARANCE_LEN, ChallengeString, ClearanceToken, leading_zero_bits};

/// Where the challenge page posts its solution. The proxy answers this path itself for
/// every domain with the challenge on and never forwards it to the origin.
pub const SUBMIT_PATH: &str = "/.well-known/defenra/challenge";

/// How long a challenge may be solved after it was issued.
pub const CHALLENGE_TTL: Duration = Duration::from_secs(300);

/// How far in the future an issue time may lie (clocks of a fleet differ a little).
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Why a challenge solution or a clearance cookie was refused; each is its own counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// Not well-formed, tampered with, or (a solution) a nonce that does not solve it.
    Bad,
    /// Too old: a challenge older than [`CHALLENGE_TTL`], a clearance past its expiry, or a
    /// challenge issued for a lower difficulty than the one now required.
    Expired,
    /// Made for another client address or host, or signed with a key this agent does not
    /// hold (another fleet, or a previous key past its grace time).
    Foreign,
}

impl Rejection {
    /// `bad`, `expired` or `foreign`: the counter label.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::Bad => "bad",
            Rejection::Expired => "expired",
            Rejection::Foreign => "foreign",
        }
    }
}

/// Leading zero bits a solution's SHA-256 must have. At most [`Difficulty::MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Difficulty(u8);

impl Difficulty {
    /// The default: 2^16 = 65,536 expected attempts, a fraction of a second in a current
    /// browser on either SHA-256 path (docs/shield.md has the measurements).
    pub const DEFAULT: Difficulty = Difficulty(16);
    /// The most the page's script supports (it compares the first 32-bit word).
    pub const MAX: Difficulty = Difficulty(32);

    /// `bits` as a difficulty, or `None` above [`Difficulty::MAX`].
    pub fn new(bits: u32) -> Option<Difficulty> {
        (bits <= u32::from(Self::MAX.0)).then_some(Difficulty(bits as u8))
    }

    /// The number of leading zero bits.
    pub const fn bits(self) -> u8 {
        self.0
    }
}

impl Default for Difficulty {
    fn default() -> Self {
        Difficulty::DEFAULT
    }
}

/// Seconds since the Unix epoch by the system clock (0 if it is set before 1970).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

/// Longest host that goes into a tag; longer ones are cut here at issue and verify alike
/// (DNS names have at most 253 characters, so no routed host is ever cut).
const MAX_HOST: usize = 255;

/// A client address as it goes into a tag: 16 bytes, IPv4 as IPv4-mapped IPv6 (so
/// `192.0.2.7` and `::ffff:192.0.2.7` are the same client).
fn address_bytes(ip: IpAddr) -> [u8; 16] {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The network a clearance is bound to: the /24 of an IPv4 address, the /64 of an IPv6
/// one, so a visitor whose address changes within its network (NAT pools, IPv6 privacy
/// addresses) keeps its pass.
fn network_bytes(ip: IpAddr) -> [u8; 16] {
    let mut out = address_bytes(ip);
    if ip.to_canonical().is_ipv4() {
        out[15] = 0;
    } else {
        out[8..].fill(0);
    }
    out
}

/// A 32-bit FNV-1a hash of the bound address and host, carried in the clear inside a token
/// (and covered by its tag) so a mismatch is told apart from a forgery without hashing:
/// it decides only which counter a refusal goes to, never whether a token is accepted.
fn binding(address: &[u8; 16], host: &[u8]) -> [u8; 4] {
    let mut hash: u32 = 0x811c_9dc5;
    for &byte in address.iter().chain(host) {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash.to_be_bytes()
}

fn host_bytes(host: &str) -> &[u8] {
    let host = host.as_bytes();
    &host[..host.len().min(MAX_HOST)]
}

#[cfg(test)]
mod tests;

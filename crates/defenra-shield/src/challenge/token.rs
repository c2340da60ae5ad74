//! The two signed tokens: the challenge string a browser must solve, and the clearance a
//! solution earns. Both are fixed-size byte strings in unpadded base64url.
//!
//! ```text
//! challenge (48 bytes, 64 characters):
//!   0 kind = 1 | 1..3 key id | 3 difficulty | 4..12 issued (Unix s, BE) | 12..16 binding | 16..48 tag
//! clearance (47 bytes, 63 characters):
//!   0 kind = 2 | 1..3 key id | 3..11 expires (Unix s, BE) | 11..15 binding | 15..47 tag
//! tag = HMAC-SHA256(key, bytes before the tag | address (16 bytes) | host length | host)
//! ```
//! The kind byte keeps the two apart (a challenge is never a clearance). The tag's message
//! stays within one SHA-256 block for hosts of up to 23 bytes (15 + 16 + 1 + 23 = 55), so a
//! clearance costs two compressions with the key's precomputed pads.
//! The challenge is exactly 64 characters, one SHA-256 block, so the page's script hashes
//! that block once and then only the block holding the nonce for every attempt.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use ring::{digest, hmac};

use super::{
    CHALLENGE_TTL, Difficulty, KeyRing, MAX_CLOCK_SKEW, Rejection, address_bytes, base64, binding,
    host_bytes, network_bytes,
};

/// Characters of a challenge string.
pub const CHALLENGE_LEN: usize = base64::encoded_len(CHALLENGE_BYTES);
/// Characters of a clearance token.
pub const CLEARANCE_LEN: usize = base64::encoded_len(CLEARANCE_BYTES);

const CHALLENGE_BYTES: usize = 48;
const CLEARANCE_BYTES: usize = 47;
const KIND_CHALLENGE: u8 = 1;
const KIND_CLEARANCE: u8 = 2;
/// The most digits of a nonce: the script counts in exact JavaScript integers (< 2^53).
const MAX_NONCE_DIGITS: usize = 16;
/// signed bytes | address | host length | host.
const MAX_MESSAGE: usize = 16 + 16 + 1 + super::MAX_HOST;

/// A challenge string: 64 URL-safe characters.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ChallengeString(pub(super) [u8; CHALLENGE_LEN]);

/// A clearance token, the value of the clearance cookie: 63 URL-safe characters.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ClearanceToken([u8; CLEARANCE_LEN]);

impl ChallengeString {
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("base64url is ASCII")
    }

    /// The lowest nonce that solves this challenge at `difficulty`, found by trying every
    /// one from 0 as the page's script does: 2^difficulty attempts on average. For tests
    /// and monitoring tools, never for the agent itself.
    pub fn solve(&self, difficulty: Difficulty) -> u64 {
        solve(self.as_str().as_bytes(), difficulty)
    }
}

/// A challenge string as a page carries it (tests and monitoring tools read it there to
/// [`ChallengeString::solve`] it). Only the form is checked: 64 base64url characters.
impl std::str::FromStr for ChallengeString {
    type Err = Rejection;

    fn from_str(text: &str) -> Result<Self, Rejection> {
        let bytes: [u8; CHALLENGE_LEN] = text.as_bytes().try_into().map_err(|_| Rejection::Bad)?;
        let url_safe = |byte: &u8| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_');
        if !bytes.iter().all(url_safe) {
            return Err(Rejection::Bad);
        }
        Ok(ChallengeString(bytes))
    }
}

impl ClearanceToken {
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("base64url is ASCII")
    }
}

impl fmt::Display for ChallengeString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for ChallengeString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChallengeString({})", self.as_str())
    }
}

impl fmt::Display for ClearanceToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for ClearanceToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClearanceToken({})", self.as_str())
    }
}

impl KeyRing {
    /// A challenge for `client` on `host` (the host as routed: lower case, no port; pass
    /// the same at verification) issued at Unix second `now`. One HMAC.
    pub fn issue_challenge(
        &self,
        client: IpAddr,
        host: &str,
        difficulty: Difficulty,
        now: u64,
    ) -> ChallengeString {
        let address = address_bytes(client);
        let host = host_bytes(host);
        let key = self.signing_key();
        let mut bytes = [0; CHALLENGE_BYTES];
        bytes[0] = KIND_CHALLENGE;
        bytes[1..3].copy_from_slice(&key.id);
        bytes[3] = difficulty.bits();
        bytes[4..12].copy_from_slice(&now.to_be_bytes());
        bytes[12..16].copy_from_slice(&binding(&address, host));
        let (signed, tag) = bytes.split_at_mut(16);
        sign(&key.hmac, signed, &address, host, tag);
        let mut out = [0; CHALLENGE_LEN];
        base64::encode_url_safe(&bytes, &mut out);
        ChallengeString(out)
    }

    /// Checks a submitted solution: `challenge` as issued to `client` on `host` by a key
    /// of this ring no longer than [`CHALLENGE_TTL`] ago, at `min_difficulty` or more, and
    /// SHA-256(`challenge` ‖ `nonce`) with as many leading zero bits. `nonce` is the
    /// decimal digits the browser sent (at most 16). One HMAC and one SHA-256, and only
    /// after the cheap checks pass.
    ///
    /// # Errors
    ///
    /// The [`Rejection`] to count: `Foreign` for another address, host or key, `Expired`
    /// for an old challenge (or one issued below `min_difficulty`), `Bad` for anything
    /// malformed, tampered with or unsolved.
    pub fn verify_solution(
        &self,
        challenge: &[u8],
        nonce: &[u8],
        client: IpAddr,
        host: &str,
        min_difficulty: Difficulty,
        now: u64,
    ) -> Result<(), Rejection> {
        let mut bytes = [0; CHALLENGE_BYTES];
        base64::decode_url_safe(challenge, &mut bytes).ok_or(Rejection::Bad)?;
        if bytes[0] != KIND_CHALLENGE
            || nonce.is_empty()
            || nonce.len() > MAX_NONCE_DIGITS
            || !nonce.iter().all(u8::is_ascii_digit)
        {
            return Err(Rejection::Bad);
        }
        let address = address_bytes(client);
        let host = host_bytes(host);
        if bytes[12..16] != binding(&address, host) {
            return Err(Rejection::Foreign);
        }
        let issued = u64::from_be_bytes(bytes[4..12].try_into().expect("8 bytes"));
        if issued > now.saturating_add(MAX_CLOCK_SKEW.as_secs()) {
            return Err(Rejection::Bad);
        }
        if now.saturating_sub(issued) > CHALLENGE_TTL.as_secs() {
            return Err(Rejection::Expired);
        }
        let difficulty = bytes[3];
        if difficulty > Difficulty::MAX.bits() {
            return Err(Rejection::Bad);
        }
        if difficulty < min_difficulty.bits() {
            return Err(Rejection::Expired);
        }
        let (signed, tag) = bytes.split_at(16);
        let mut message = [0; MAX_MESSAGE];
        let message = message_into(&mut message, signed, &address, host);
        self.verify([bytes[1], bytes[2]], now, message, tag)?;
        let mut context = digest::Context::new(&digest::SHA256);
        context.update(challenge);
        context.update(nonce);
        if leading_zero_bits(context.finish().as_ref()) < u32::from(difficulty) {
            return Err(Rejection::Bad);
        }
        Ok(())
    }

    /// A clearance for `client`'s network (its /24 or /64) on `host`, valid until `now +
    /// ttl`. One HMAC.
    pub fn issue_clearance(
        &self,
        client: IpAddr,
        host: &str,
        ttl: Duration,
        now: u64,
    ) -> ClearanceToken {
        let network = network_bytes(client);
        let host = host_bytes(host);
        let key = self.signing_key();
        let mut bytes = [0; CLEARANCE_BYTES];
        bytes[0] = KIND_CLEARANCE;
        bytes[1..3].copy_from_slice(&key.id);
        bytes[3..11].copy_from_slice(&now.saturating_add(ttl.as_secs()).to_be_bytes());
        bytes[11..15].copy_from_slice(&binding(&network, host));
        let (signed, tag) = bytes.split_at_mut(15);
        sign(&key.hmac, signed, &network, host, tag);
        let mut out = [0; CLEARANCE_LEN];
        base64::encode_url_safe(&bytes, &mut out);
        ClearanceToken(out)
    }

    /// Checks a clearance cookie's value: issued by a key of this ring for `client`'s
    /// network on `host`, and not expired at Unix second `now`. One HMAC, after the cheap
    /// checks; no allocation.
    ///
    /// # Errors
    ///
    /// The [`Rejection`] to count: `Foreign` (another network, host or key), `Expired`,
    /// `Bad` (malformed or tampered with).
    pub fn verify_clearance(
        &self,
        token: &[u8],
        client: IpAddr,
        host: &str,
        now: u64,
    ) -> Result<(), Rejection> {
        let mut bytes = [0; CLEARANCE_BYTES];
        base64::decode_url_safe(token, &mut bytes).ok_or(Rejection::Bad)?;
        if bytes[0] != KIND_CLEARANCE {
            return Err(Rejection::Bad);
        }
        let network = network_bytes(client);
        let host = host_bytes(host);
        if bytes[11..15] != binding(&network, host) {
            return Err(Rejection::Foreign);
        }
        let expires = u64::from_be_bytes(bytes[3..11].try_into().expect("8 bytes"));
        if expires <= now {
            return Err(Rejection::Expired);
        }
        let (signed, tag) = bytes.split_at(15);
        let mut message = [0; MAX_MESSAGE];
        let message = message_into(&mut message, signed, &network, host);
        self.verify([bytes[1], bytes[2]], now, message, tag)
    }
}

/// Leading zero bits of `digest`, most significant bit of the first byte first.
pub fn leading_zero_bits(digest: &[u8]) -> u32 {
    let mut bits = 0;
    for &byte in digest {
        if byte != 0 {
            return bits + byte.leading_zeros();
        }
        bits += 8;
    }
    bits
}

fn solve(challenge: &[u8], difficulty: Difficulty) -> u64 {
    let mut prefix = digest::Context::new(&digest::SHA256);
    prefix.update(challenge);
    let mut digits = [0u8; 20];
    (0..)
        .find(|&nonce: &u64| {
            let mut context = prefix.clone();
            context.update(decimal(nonce, &mut digits));
            leading_zero_bits(context.finish().as_ref()) >= u32::from(difficulty.bits())
        })
        .expect("a solution exists long before u64 runs out")
}

/// `value` in decimal, written at the end of `buffer`.
pub(crate) fn decimal(mut value: u64, buffer: &mut [u8; 20]) -> &[u8] {
    let mut at = buffer.len();
    loop {
        at -= 1;
        buffer[at] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            return &buffer[at..];
        }
    }
}

fn sign(key: &hmac::Key, signed: &[u8], address: &[u8; 16], host: &[u8], tag_out: &mut [u8]) {
    let mut message = [0; MAX_MESSAGE];
    let message = message_into(&mut message, signed, address, host);
    tag_out.copy_from_slice(hmac::sign(key, message).as_ref());
}

fn message_into<'b>(
    buffer: &'b mut [u8; MAX_MESSAGE],
    signed: &[u8],
    address: &[u8; 16],
    host: &[u8],
) -> &'b [u8] {
    let mut at = 0;
    for part in [signed, &address[..], &[host.len() as u8], host] {
        buffer[at..at + part.len()].copy_from_slice(part);
        at += part.len();
    }
    &buffer[..at]
}

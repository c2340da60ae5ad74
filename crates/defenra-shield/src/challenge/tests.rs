//! Signing and verification of challenges and clearances: valid ones pass, forged, expired,
//! foreign (address, host, key) ones fail with the right reason, rotation keeps the
//! previous key for its grace time.

use std::net::IpAddr;
use std::time::Duration;

use super::*;

const NOW: u64 = 1_800_000_000;
const HOST: &str = "example.com";
const LOW: Difficulty = Difficulty(8);

fn ip(text: &str) -> IpAddr {
    text.parse().expect("address")
}

fn ring(byte: u8) -> KeyRing {
    KeyRing::new(&ShieldKey::from_bytes([byte; 32]))
}

/// A solved challenge: the challenge string and its lowest nonce.
fn solved(keys: &KeyRing, client: IpAddr, difficulty: Difficulty) -> (String, String) {
    let challenge = keys.issue_challenge(client, HOST, difficulty, NOW);
    let nonce = challenge.solve(difficulty);
    (challenge.to_string(), nonce.to_string())
}

/// The first nonce at or above `from` that does NOT solve `challenge` at `difficulty`.
fn wrong_nonce(challenge: &str, difficulty: Difficulty, from: u64) -> String {
    (from..)
        .find(|nonce| {
            let digest = ring::digest::digest(
                &ring::digest::SHA256,
                format!("{challenge}{nonce}").as_bytes(),
            );
            token::leading_zero_bits(digest.as_ref()) < u32::from(difficulty.bits())
        })
        .expect("most nonces fail")
        .to_string()
}

#[test]
fn a_solution_computed_here_passes_and_really_has_the_leading_zero_bits() {
    let keys = ring(1);
    let client = ip("192.0.2.7");
    let (challenge, nonce) = solved(&keys, client, LOW);
    assert_eq!(challenge.len(), CHALLENGE_LEN);
    assert_eq!(CHALLENGE_LEN, 64, "one SHA-256 block");
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        format!("{challenge}{nonce}").as_bytes(),
    );
    assert!(leading_zero_bits(digest.as_ref()) >= 8);
    assert_eq!(
        keys.verify_solution(
            challenge.as_bytes(),
            nonce.as_bytes(),
            client,
            HOST,
            LOW,
            NOW
        ),
        Ok(())
    );
    // Still valid until the challenge's five minutes are over.
    let last = NOW + CHALLENGE_TTL.as_secs();
    assert_eq!(
        keys.verify_solution(
            challenge.as_bytes(),
            nonce.as_bytes(),
            client,
            HOST,
            LOW,
            last
        ),
        Ok(())
    );
}

#[test]
fn a_nonce_that_does_not_solve_it_is_bad() {
    let keys = ring(1);
    let client = ip("192.0.2.7");
    let (challenge, _) = solved(&keys, client, LOW);
    let nonce = wrong_nonce(&challenge, LOW, 0);
    assert_eq!(
        keys.verify_solution(
            challenge.as_bytes(),
            nonce.as_bytes(),
            client,
            HOST,
            LOW,
            NOW
        ),
        Err(Rejection::Bad)
    );
    for junk in ["", "-1", "1.0", "12a", " 1", "12345678901234567"] {
        assert_eq!(
            keys.verify_solution(
                challenge.as_bytes(),
                junk.as_bytes(),
                client,
                HOST,
                LOW,
                NOW
            ),
            Err(Rejection::Bad),
            "nonce {junk:?}"
        );
    }
}

#[test]
fn forged_challenges_are_bad() {
    let keys = ring(1);
    let client = ip("192.0.2.7");
    let difficulty = Difficulty(4);
    let (challenge, _) = solved(&keys, client, difficulty);
    // Flip each character of the tag part and of the fields that are not checked in the
    // clear: each change breaks the tag.
    let mut bytes = [0u8; 48];
    base64::decode_url_safe(challenge.as_bytes(), &mut bytes).expect("decodes");
    for at in [1, 2, 4, 11, 16, 30, 47] {
        let mut forged = bytes;
        forged[at] ^= 0x01;
        let mut text = [0u8; 64];
        base64::encode_url_safe(&forged, &mut text);
        let text = std::str::from_utf8(&text).expect("ascii").to_owned();
        let nonce = ChallengeString(text.as_bytes().try_into().expect("64")).solve(difficulty);
        let outcome = keys.verify_solution(
            text.as_bytes(),
            nonce.to_string().as_bytes(),
            client,
            HOST,
            difficulty,
            NOW,
        );
        let expected = if matches!(at, 1 | 2) {
            Rejection::Foreign // another key id: a key this ring does not hold
        } else {
            Rejection::Bad
        };
        assert_eq!(outcome, Err(expected), "byte {at} flipped");
    }
    // A lower difficulty written in: the tag no longer matches.
    let mut easier = bytes;
    easier[3] = 0;
    let mut text = [0u8; 64];
    base64::encode_url_safe(&easier, &mut text);
    assert_eq!(
        keys.verify_solution(&text, b"0", client, HOST, Difficulty(0), NOW),
        Err(Rejection::Bad)
    );
    // Not base64url, wrong length, a clearance passed off as a challenge.
    let clearance = keys.issue_clearance(client, HOST, Duration::from_secs(60), NOW);
    for junk in [
        "",
        "short",
        &challenge[..63],
        &format!("{challenge}A"),
        &challenge.replace(|c: char| c.is_ascii_digit(), "+"),
        &format!("{}A", clearance.as_str()),
    ] {
        if junk == challenge {
            continue;
        }
        assert_eq!(
            keys.verify_solution(junk.as_bytes(), b"1", client, HOST, Difficulty(0), NOW),
            Err(Rejection::Bad),
            "challenge {junk:?}"
        );
    }
}

#[test]
fn old_challenges_are_expired_and_ones_from_the_future_bad() {
    let keys = ring(1);
    let client = ip("192.0.2.7");
    let (challenge, nonce) = solved(&keys, client, LOW);
    let too_late = NOW + CHALLENGE_TTL.as_secs() + 1;
    assert_eq!(
        keys.verify_solution(
            challenge.as_bytes(),
            nonce.as_bytes(),
            client,
            HOST,
            LOW,
            too_late
        ),
        Err(Rejection::Expired)
    );
    // Issued a little ahead of this agent's clock (another agent of the fleet): fine.
    let behind = NOW - MAX_CLOCK_SKEW.as_secs();
    assert_eq!(
        keys.verify_solution(
            challenge.as_bytes(),
            nonce.as_bytes(),
            client,
            HOST,
            LOW,
            behind
        ),
        Ok(())
    );
    assert_eq!(
        keys.verify_solution(
            challenge.as_bytes(),
            nonce.as_bytes(),
            client,
            HOST,
            LOW,
            behind - 1
        ),
        Err(Rejection::Bad)
    );
    // The operator raised the difficulty since: outdated, not forged.
    assert_eq!(
        keys.verify_solution(
            challenge.as_bytes(),
            nonce.as_bytes(),
            client,
            HOST,
            Difficulty(9),
            NOW
        ),
        Err(Rejection::Expired)
    );
}

#[test]
fn a_solution_from_another_address_host_or_key_is_foreign() {
    let keys = ring(1);
    let client = ip("192.0.2.7");
    let (challenge, nonce) = solved(&keys, client, LOW);
    let verify = |keys: &KeyRing, client: IpAddr, host: &str| {
        keys.verify_solution(
            challenge.as_bytes(),
            nonce.as_bytes(),
            client,
            host,
            LOW,
            NOW,
        )
    };
    // A challenge binds the exact address, not its network.
    assert_eq!(
        verify(&keys, ip("192.0.2.8"), HOST),
        Err(Rejection::Foreign)
    );
    assert_eq!(
        verify(&keys, ip("2001:db8::7"), HOST),
        Err(Rejection::Foreign)
    );
    assert_eq!(
        verify(&keys, client, "other.example"),
        Err(Rejection::Foreign)
    );
    assert_eq!(verify(&ring(2), client, HOST), Err(Rejection::Foreign));
    // The same address written as IPv4-mapped IPv6 is the same client.
    assert_eq!(verify(&keys, ip("::ffff:192.0.2.7"), HOST), Ok(()));
}

#[test]
fn a_clearance_passes_for_its_network_and_host_until_it_expires() {
    let keys = ring(1);
    let ttl = Duration::from_secs(900);
    let token = keys.issue_clearance(ip("192.0.2.7"), HOST, ttl, NOW);
    assert_eq!(token.as_str().len(), CLEARANCE_LEN);
    let verify = |client: &str, host: &str, now: u64| {
        keys.verify_clearance(token.as_str().as_bytes(), ip(client), host, now)
    };
    assert_eq!(verify("192.0.2.7", HOST, NOW), Ok(()));
    assert_eq!(verify("192.0.2.200", HOST, NOW), Ok(()), "same /24");
    assert_eq!(verify("::ffff:192.0.2.1", HOST, NOW), Ok(()), "mapped");
    assert_eq!(verify("192.0.2.7", HOST, NOW + 899), Ok(()));
    assert_eq!(
        verify("192.0.2.7", HOST, NOW + 900),
        Err(Rejection::Expired)
    );
    assert_eq!(verify("192.0.3.7", HOST, NOW), Err(Rejection::Foreign));
    assert_eq!(
        verify("192.0.2.7", "www.example.com", NOW),
        Err(Rejection::Foreign)
    );
    assert_eq!(
        ring(2).verify_clearance(token.as_str().as_bytes(), ip("192.0.2.7"), HOST, NOW),
        Err(Rejection::Foreign),
        "another key"
    );

    let v6 = keys.issue_clearance(ip("2001:db8:1:2:aaaa::1"), HOST, ttl, NOW);
    let verify6 =
        |client: &str| keys.verify_clearance(v6.as_str().as_bytes(), ip(client), HOST, NOW);
    assert_eq!(
        verify6("2001:db8:1:2:ffff:ffff:ffff:ffff"),
        Ok(()),
        "same /64"
    );
    assert_eq!(verify6("2001:db8:1:3::1"), Err(Rejection::Foreign));
    assert_eq!(verify6("192.0.2.7"), Err(Rejection::Foreign));
}

#[test]
fn tampered_clearances_are_bad() {
    let keys = ring(1);
    let client = ip("192.0.2.7");
    let token = keys.issue_clearance(client, HOST, Duration::from_secs(900), NOW);
    let mut bytes = [0u8; 47];
    base64::decode_url_safe(token.as_str().as_bytes(), &mut bytes).expect("decodes");
    // A later expiry written in, a flipped tag bit.
    for (at, change) in [(9, 0x01), (10, 0x80), (20, 0x01), (46, 0x40)] {
        let mut forged = bytes;
        forged[at] ^= change;
        let mut text = [0u8; 63];
        base64::encode_url_safe(&forged, &mut text);
        assert_eq!(
            keys.verify_clearance(&text, client, HOST, NOW),
            Err(Rejection::Bad),
            "byte {at}"
        );
    }
    let challenge = keys.issue_challenge(client, HOST, LOW, NOW);
    for junk in [&b""[..], b"garbage", &challenge.as_str().as_bytes()[..63]] {
        assert_eq!(
            keys.verify_clearance(junk, client, HOST, NOW),
            Err(Rejection::Bad)
        );
    }
}

#[test]
fn the_previous_key_is_accepted_during_its_grace_time_and_signs_nothing() {
    let old = ring(1);
    let client = ip("192.0.2.7");
    let (challenge, nonce) = solved(&old, client, LOW);
    let cookie = old.issue_clearance(client, HOST, Duration::from_secs(900), NOW);
    let rotated = old.rotate(
        &ShieldKey::from_bytes([2; 32]),
        NOW + 10,
        Duration::from_secs(900),
    );
    let solution_at = |now| {
        rotated.verify_solution(
            challenge.as_bytes(),
            nonce.as_bytes(),
            client,
            HOST,
            LOW,
            now,
        )
    };
    let cookie_at = |now| rotated.verify_clearance(cookie.as_str().as_bytes(), client, HOST, now);
    assert_eq!(solution_at(NOW + 10), Ok(()));
    assert_eq!(cookie_at(NOW + 10), Ok(()));
    assert_eq!(cookie_at(NOW + 899), Ok(()));
    // New tokens come from the new key: the old ring does not know them.
    let fresh = rotated.issue_clearance(client, HOST, Duration::from_secs(900), NOW + 10);
    assert_eq!(
        old.verify_clearance(fresh.as_str().as_bytes(), client, HOST, NOW + 10),
        Err(Rejection::Foreign)
    );
    assert_eq!(
        rotated.verify_clearance(fresh.as_str().as_bytes(), client, HOST, NOW + 10),
        Ok(())
    );
    // Past the grace time the previous key is foreign, even for a token that claims a
    // later expiry (a leaked old key cannot mint lasting passes).
    let long = old.issue_clearance(client, HOST, Duration::from_secs(86_400), NOW);
    let grace_end = NOW + 10 + 900;
    assert_eq!(
        rotated.verify_clearance(long.as_str().as_bytes(), client, HOST, grace_end - 1),
        Ok(())
    );
    assert_eq!(
        rotated.verify_clearance(long.as_str().as_bytes(), client, HOST, grace_end),
        Err(Rejection::Foreign)
    );
    // A second rotation drops the first key at once.
    let twice = rotated.rotate(
        &ShieldKey::from_bytes([3; 32]),
        NOW + 20,
        Duration::from_secs(900),
    );
    assert_eq!(
        twice.verify_clearance(cookie.as_str().as_bytes(), client, HOST, NOW + 20),
        Err(Rejection::Foreign)
    );
}

#[test]
fn cookies_are_checked_among_every_copy_of_the_name() {
    let keys = ring(1);
    let client = ip("192.0.2.7");
    let token = keys.issue_clearance(client, HOST, Duration::from_secs(900), NOW);
    let stale = keys.issue_clearance(client, HOST, Duration::from_secs(1), NOW - 10);
    let check = |fields: &[&str]| {
        keys.check_cookies(
            fields.iter().map(|field| field.as_bytes()),
            "pass",
            client,
            HOST,
            NOW,
        )
    };
    assert_eq!(check(&[&format!("a=1; pass={token}")]), Clearance::Valid);
    assert_eq!(
        check(&[&format!("pass={stale}"), &format!("pass={token}")]),
        Clearance::Valid,
        "a stale copy first"
    );
    assert_eq!(check(&["a=1"]), Clearance::Missing);
    assert_eq!(check(&[]), Clearance::Missing);
    assert_eq!(
        check(&[&format!("pass={stale}; pass=junk")]),
        Clearance::Rejected(Rejection::Expired)
    );
    let many = format!("pass=a; pass=b; pass=c; pass=d; pass={token}");
    assert_eq!(
        check(&[&many]),
        Clearance::Rejected(Rejection::Bad),
        "only the first four copies are tried"
    );
}

#[test]
fn difficulty_stays_within_what_the_script_handles() {
    assert_eq!(Difficulty::new(0).map(Difficulty::bits), Some(0));
    assert_eq!(Difficulty::new(32).map(Difficulty::bits), Some(32));
    assert_eq!(Difficulty::new(33), None);
    assert_eq!(Difficulty::default(), Difficulty::DEFAULT);
}

#[test]
fn very_long_hosts_are_cut_the_same_way_at_issue_and_verify() {
    let keys = ring(1);
    let client = ip("192.0.2.7");
    let host = "a".repeat(300);
    let token = keys.issue_clearance(client, &host, Duration::from_secs(60), NOW);
    assert_eq!(
        keys.verify_clearance(token.as_str().as_bytes(), client, &host, NOW),
        Ok(())
    );
}

#[test]
fn a_challenge_read_back_from_its_text_solves_the_same() {
    let keys = ring(1);
    let difficulty = Difficulty::new(6).expect("difficulty");
    let issued = keys.issue_challenge(ip("192.0.2.7"), "example.com", difficulty, NOW);
    let read: ChallengeString = issued.as_str().parse().expect("parsed");
    assert_eq!(read, issued);
    assert_eq!(read.solve(difficulty), issued.solve(difficulty));
    for junk in [
        "",
        "abc",
        &issued.as_str()[1..],
        &format!("{}=", &issued.as_str()[1..]),
    ] {
        assert_eq!(
            junk.parse::<ChallengeString>(),
            Err(Rejection::Bad),
            "{junk:?}"
        );
    }
}

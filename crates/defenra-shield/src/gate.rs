//! The browser challenge on the request path: a request's clearance cookies checked, a
//! challenge issued, a posted solution verified, each counted; and the key ring they are
//! all signed with, swapped whole by a rotation.
//!
//! The HTTP crate asks, for a domain with `jsChallenge.enabled`: [`Shield::check`] first
//! (limits, blocks, bans: a blocked address gets the challenge instead of 429), then, for a
//! request within the limits, [`Shield::clearance`]; without a valid clearance it answers
//! the page with [`Shield::issue_challenge`]. A POST to the submit path goes to
//! [`Shield::verify_solution`] instead. Times are Unix seconds of the shield's clock, so a
//! test on a manual clock moves challenges and cookies through their lives too.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use crate::challenge::{
    ChallengeString, Clearance, Difficulty, FormError, KeyRing, Rejection, Scheme, ShieldKey,
    parse_submission, set_cookie,
};
use crate::stats::reason_index;
use crate::{DomainPolicy, Shield};

/// The answer to a challenge solution posted to the submit path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Solution<'a> {
    /// Solved: send the visitor back to `location` (303 See Other) with the
    /// `Set-Cookie` value `set_cookie`.
    Cleared {
        location: Cow<'a, str>,
        set_cookie: String,
    },
    /// Not solved (counted by reason): answer a fresh challenge that returns to `url`.
    Refused {
        rejection: Rejection,
        url: Cow<'a, str>,
    },
    /// Not a challenge form at all (counted as `bad`): 400, or 413 for
    /// [`FormError::TooLarge`].
    Malformed(FormError),
}

impl Shield {
    /// Whether the request's `Cookie` fields (`cookie_fields`, every field: HTTP/2 may split
    /// them) carry a valid clearance of the domain of `policy` for `client` on `host` (the
    /// host as routed: lower case, no port). Counts the accepted and the rejected ones; no
    /// allocation, one HMAC for a valid cookie.
    pub fn clearance<'c>(
        &self,
        policy: &DomainPolicy,
        client: IpAddr,
        host: &str,
        cookie_fields: impl IntoIterator<Item = &'c [u8]>,
    ) -> Clearance {
        let clearance = self.keys.load().check_cookies(
            cookie_fields,
            &policy.settings.js_challenge.cookie_name,
            client,
            host,
            self.clock.unix_s(),
        );
        match clearance {
            Clearance::Valid => {
                self.stats.clearances_accepted.fetch_add(1, Relaxed);
            }
            Clearance::Rejected(rejection) => {
                self.stats.clearances_rejected[reason_index(rejection)].fetch_add(1, Relaxed);
            }
            Clearance::Missing => {}
        }
        clearance
    }

    /// A challenge for `client` on `host` at the configured difficulty, counted as issued.
    /// One HMAC.
    pub fn issue_challenge(&self, client: IpAddr, host: &str) -> ChallengeString {
        self.stats.challenges_issued.fetch_add(1, Relaxed);
        self.keys.load().issue_challenge(
            client,
            host,
            self.options.challenge_difficulty,
            self.clock.unix_s(),
        )
    }

    /// Verifies the form `body` posted to the submit path by `client` on `host` for the
    /// domain of `policy` (one HMAC and one SHA-256). A solution clears the visitor for the
    /// domain's `ttlSeconds` with a cookie for its network (`Secure` when `scheme` is
    /// HTTPS); when the submit itself was refused by the rate limit (`blocked`, the address
    /// is blocked), solving also lifts the block and forgets its count.
    pub fn verify_solution<'b>(
        &self,
        policy: &DomainPolicy,
        client: IpAddr,
        host: &str,
        body: &'b [u8],
        scheme: Scheme,
        blocked: bool,
    ) -> Solution<'b> {
        let submission = match parse_submission(body) {
            Ok(submission) => submission,
            Err(error) => {
                self.stats.challenges_failed[reason_index(Rejection::Bad)].fetch_add(1, Relaxed);
                return Solution::Malformed(error);
            }
        };
        let now = self.clock.unix_s();
        let keys = self.keys.load();
        let verified = keys.verify_solution(
            submission.challenge.as_bytes(),
            submission.nonce.as_bytes(),
            client,
            host,
            self.options.challenge_difficulty,
            now,
        );
        if let Err(rejection) = verified {
            self.stats.challenges_failed[reason_index(rejection)].fetch_add(1, Relaxed);
            return Solution::Refused {
                rejection,
                url: submission.url,
            };
        }
        self.stats.challenges_solved.fetch_add(1, Relaxed);
        if blocked {
            self.clear_block(policy, client);
        }
        let settings = &policy.settings.js_challenge;
        let token = keys.issue_clearance(client, host, settings.ttl, now);
        Solution::Cleared {
            location: submission.url,
            set_cookie: set_cookie(&settings.cookie_name, &token, settings.ttl, scheme),
        }
    }

    /// The difficulty challenges are issued at.
    pub fn difficulty(&self) -> Difficulty {
        self.options.challenge_difficulty
    }

    /// The key ring in use.
    pub fn keys(&self) -> Arc<KeyRing> {
        self.keys.load_full()
    }

    /// Makes `key` the signing key (a re-read key file). The previous key stays accepted for
    /// the longest clearance `ttlSeconds` of the current config (at least a challenge's
    /// five minutes), so cookies issued just before live out their time. False when `key`
    /// is the current key already: re-reading an unchanged file changes nothing.
    pub fn rotate_key(&self, key: &ShieldKey) -> bool {
        let grace = self.agent.load().longest_clearance;
        let current = self.keys.load_full();
        let rotated = current.rotate(key, self.clock.unix_s(), grace);
        if rotated.current() == current.current() {
            return false;
        }
        self.keys.store(Arc::new(rotated));
        true
    }
}

/// A random key for a shield given none: it lives as long as the process. Should the
/// system's generator fail (it does not on a booted Linux), a key from the clock and the
/// process id keeps the agent serving; its challenges are then guessable, which a log line
/// at startup (the caller's) says.
pub(crate) fn process_key() -> ShieldKey {
    ShieldKey::generate().unwrap_or_else(|_| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_nanos());
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        context.update(&nanos.to_le_bytes());
        context.update(&std::process::id().to_le_bytes());
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(context.finish().as_ref());
        ShieldKey::from_bytes(bytes)
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use defenra_config::{AntiDdos, JsChallenge, RateLimit};

    use super::*;
    use crate::{Check, Clock, ManualClock, ShieldOptions};

    const HOST: &str = "shop.test";

    fn shield() -> (Shield, ManualClock, Arc<DomainPolicy>) {
        let (clock, manual) = Clock::manual();
        let shield = Shield::new(ShieldOptions {
            clock,
            challenge_difficulty: Difficulty::new(8).expect("difficulty"),
            shield_key: Some(ShieldKey::from_bytes([7; 32])),
            ..ShieldOptions::default()
        });
        let settings = AntiDdos {
            enabled: true,
            rate_limit: RateLimit {
                window: Duration::from_secs(10),
                max_requests: 2,
            },
            js_challenge: JsChallenge {
                enabled: true,
                cookie_name: "pass".to_owned(),
                ttl: Duration::from_secs(900),
            },
            ..AntiDdos::default()
        };
        let policy = Arc::new(DomainPolicy::new(
            Arc::from(HOST),
            16,
            Arc::new(settings),
            Arc::default(),
        ));
        (shield, manual, policy)
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("address")
    }

    fn form(challenge: &ChallengeString, nonce: u64, url: &str) -> Vec<u8> {
        format!("challenge={challenge}&nonce={nonce}&url={url}").into_bytes()
    }

    /// The cookie's `name=value` from a `Set-Cookie` value.
    fn cookie(set_cookie: &str) -> &str {
        set_cookie.split(';').next().expect("a pair")
    }

    #[test]
    fn a_solved_challenge_earns_a_cookie_that_clears_the_network_until_it_expires() {
        let (shield, clock, policy) = shield();
        let client = ip("192.0.2.7");
        let challenge = shield.issue_challenge(client, HOST);
        let nonce = challenge.solve(shield.difficulty());
        let body = form(&challenge, nonce, "%2Fshop%3Fid%3D7");
        let Solution::Cleared {
            location,
            set_cookie,
        } = shield.verify_solution(&policy, client, HOST, &body, Scheme::Https, false)
        else {
            panic!("not solved");
        };
        assert_eq!(location, "/shop?id=7");
        assert!(set_cookie.starts_with("pass="), "{set_cookie}");
        assert!(set_cookie.ends_with("; Secure"), "{set_cookie}");
        let fields = [cookie(&set_cookie).as_bytes()];
        for same_network in ["192.0.2.7", "192.0.2.200"] {
            assert_eq!(
                shield.clearance(&policy, ip(same_network), HOST, fields),
                Clearance::Valid
            );
        }
        assert_eq!(
            shield.clearance(&policy, ip("192.0.3.7"), HOST, fields),
            Clearance::Rejected(Rejection::Foreign)
        );
        assert_eq!(
            shield.clearance(&policy, client, "other.test", fields),
            Clearance::Rejected(Rejection::Foreign)
        );
        clock.advance(Duration::from_secs(901));
        assert_eq!(
            shield.clearance(&policy, client, HOST, fields),
            Clearance::Rejected(Rejection::Expired)
        );
        assert_eq!(
            shield.clearance(&policy, client, HOST, []),
            Clearance::Missing
        );
        let stats = shield.stats();
        assert_eq!((stats.challenges_issued, stats.challenges_solved), (1, 1));
        assert_eq!(stats.clearances_accepted, 2);
        assert_eq!(
            (
                stats.clearances_rejected_foreign,
                stats.clearances_rejected_expired
            ),
            (2, 1)
        );
    }

    #[test]
    fn wrong_stale_and_foreign_solutions_are_refused_and_counted_by_reason() {
        let (shield, clock, policy) = shield();
        let client = ip("192.0.2.7");
        let challenge = shield.issue_challenge(client, HOST);
        let nonce = challenge.solve(shield.difficulty());
        let refused = |from: &str, nonce: u64| match shield.verify_solution(
            &policy,
            ip(from),
            HOST,
            &form(&challenge, nonce, "%2Fback"),
            Scheme::Http,
            false,
        ) {
            Solution::Refused { rejection, url } => {
                assert_eq!(url, "/back");
                rejection
            }
            other => panic!("{other:?}"),
        };
        // The lowest solving nonce is the solver's: the one before it does not solve.
        if nonce > 0 {
            assert_eq!(refused("192.0.2.7", nonce - 1), Rejection::Bad);
        }
        assert_eq!(refused("192.0.2.8", nonce), Rejection::Foreign);
        clock.advance(Duration::from_secs(301));
        assert_eq!(refused("192.0.2.7", nonce), Rejection::Expired);
        assert_eq!(
            shield.verify_solution(&policy, client, HOST, b"nonce=1", Scheme::Http, false),
            Solution::Malformed(FormError::Missing("challenge"))
        );
        let stats = shield.stats();
        assert_eq!(stats.challenges_solved, 0);
        assert_eq!(
            stats.challenges_failed_bad,
            1 + u64::from(nonce > 0),
            "the malformed form is bad too"
        );
        assert_eq!(
            (
                stats.challenges_failed_foreign,
                stats.challenges_failed_expired
            ),
            (1, 1)
        );
    }

    #[test]
    fn solving_while_blocked_lifts_the_block_and_forgets_the_count() {
        let (shield, _clock, policy) = shield();
        let client = ip("192.0.2.9");
        assert_eq!(shield.check(&policy, client), Check::Proceed);
        assert_eq!(shield.check(&policy, client), Check::Proceed);
        assert!(matches!(
            shield.check(&policy, client),
            Check::Limited { .. }
        ));
        let challenge = shield.issue_challenge(client, HOST);
        let body = form(&challenge, challenge.solve(shield.difficulty()), "%2F");
        assert!(matches!(
            shield.verify_solution(&policy, client, HOST, &body, Scheme::Http, true),
            Solution::Cleared { .. }
        ));
        // A fresh start: the whole burst again.
        assert_eq!(shield.check(&policy, client), Check::Proceed);
        assert_eq!(shield.check(&policy, client), Check::Proceed);
        assert!(matches!(
            shield.check(&policy, client),
            Check::Limited { .. }
        ));
    }

    #[test]
    fn a_rotated_key_signs_while_the_previous_one_is_accepted_for_the_longest_ttl() {
        let (shield, clock, policy) = shield();
        let client = ip("192.0.2.7");
        let challenge = shield.issue_challenge(client, HOST);
        let body = form(&challenge, challenge.solve(shield.difficulty()), "%2F");
        let Solution::Cleared { set_cookie, .. } =
            shield.verify_solution(&policy, client, HOST, &body, Scheme::Http, false)
        else {
            panic!("not solved");
        };
        let old_cookie = cookie(&set_cookie).to_owned();
        assert!(
            !shield.rotate_key(&ShieldKey::from_bytes([7; 32])),
            "same key"
        );
        assert!(shield.rotate_key(&ShieldKey::from_bytes([8; 32])));
        assert_eq!(
            shield.keys().current(),
            ShieldKey::from_bytes([8; 32]).fingerprint()
        );
        // No config loaded: the grace time is the challenge's five minutes.
        clock.advance(Duration::from_secs(299));
        assert_eq!(
            shield.clearance(&policy, client, HOST, [old_cookie.as_bytes()]),
            Clearance::Valid
        );
        clock.advance(Duration::from_secs(2));
        assert_eq!(
            shield.clearance(&policy, client, HOST, [old_cookie.as_bytes()]),
            Clearance::Rejected(Rejection::Foreign)
        );

        // With a config whose longest clearance lasts an hour, the previous key does too.
        let doc = r#"{"domains": [
            {"domain": "a.test", "httpProxy": {"antiDDoS": {"enabled": true,
                "jsChallenge": {"enabled": true, "ttlSeconds": 3600}}}},
            {"domain": "b.test", "httpProxy": {"antiDDoS": {"enabled": true,
                "jsChallenge": {"enabled": true, "ttlSeconds": 600}}}}]}"#;
        let compiled = defenra_config::compile(doc.as_bytes()).expect("compiles");
        let snapshot = Arc::new(compiled.snapshot);
        defenra_config::Reload::reload(&shield, &snapshot, &mut Vec::new());
        let newer_cookie = {
            let challenge = shield.issue_challenge(client, HOST);
            let body = form(&challenge, challenge.solve(shield.difficulty()), "%2F");
            match shield.verify_solution(&policy, client, HOST, &body, Scheme::Http, false) {
                Solution::Cleared { set_cookie, .. } => cookie(&set_cookie).to_owned(),
                other => panic!("{other:?}"),
            }
        };
        let rotated_at = shield.clock().unix_s();
        assert!(shield.rotate_key(&ShieldKey::from_bytes([9; 32])));
        assert_eq!(
            shield.keys().previous(),
            Some((
                ShieldKey::from_bytes([8; 32]).fingerprint(),
                rotated_at + 3600
            ))
        );
        clock.advance(Duration::from_secs(899));
        assert_eq!(
            shield.clearance(&policy, client, HOST, [newer_cookie.as_bytes()]),
            Clearance::Valid,
            "the cookie lives out its 900 s"
        );
    }
}

//! Enrolment with Defenra Core's one-time connect URL: `GET {core}/api/agent/connect/{token}`
//! answers with the agent's id and key, once.
//!
//! Core records the caller's address (and its GeoIP location) as the agent's, and clears the
//! token on first use, so this runs on the edge host itself and a failure after Core answered
//! cannot be retried with the same URL.

use std::fmt;
use std::io::Read;
use std::time::Duration;

use crate::wire;

/// The part of a connect URL's path that precedes the token.
const CONNECT_PATH: &str = "/api/agent/connect/";
/// Largest connect answer read (it is a few hundred bytes).
const MAX_ANSWER: u64 = 1024 * 1024;

/// A parsed connect URL: Core's base URL and the one-time token.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectUrl {
    url: String,
    core_url: String,
}

impl ConnectUrl {
    /// Parses `https://CORE/api/agent/connect/TOKEN` (`http` too, for a Core without TLS).
    ///
    /// # Errors
    ///
    /// [`ConnectError::BadUrl`] when `text` is not such a URL or has no token.
    pub fn parse(text: &str) -> Result<ConnectUrl, ConnectError> {
        let text = text.trim();
        let bad = |reason: &str| ConnectError::BadUrl {
            url: text.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: ureq::http::Uri = text.parse().map_err(|_| bad("not a URL"))?;
        let scheme = uri.scheme_str().unwrap_or("");
        if scheme != "https" && scheme != "http" {
            return Err(bad("the scheme must be https or http"));
        }
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        let path = uri.path();
        let Some(position) = path.find(CONNECT_PATH) else {
            return Err(bad("the path does not contain /api/agent/connect/"));
        };
        let token = &path[position + CONNECT_PATH.len()..];
        if token.is_empty() || token.contains('/') {
            return Err(bad("there is no token after /api/agent/connect/"));
        }
        // Everything before the connect path: scheme://host[:port], plus a path prefix when
        // Core is served below one.
        let core_url = format!("{scheme}://{authority}{}", &path[..position]);
        Ok(ConnectUrl {
            url: format!("{core_url}{CONNECT_PATH}{token}"),
            core_url,
        })
    }

    /// Core's base URL, as `CORE_URL` wants it (`https://core.example.net`).
    pub fn core_url(&self) -> &str {
        &self.core_url
    }
}

impl fmt::Debug for ConnectUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The token is a credential until it is used.
        write!(f, "ConnectUrl({}{CONNECT_PATH}…)", self.core_url)
    }
}

/// What Core handed out: the credentials to poll with, and where it placed the agent.
#[derive(Clone, PartialEq, Eq)]
pub struct Enrolment {
    /// `CORE_URL`: the connect URL's scheme, host and port.
    pub core_url: String,
    pub agent_id: String,
    pub agent_key: String,
    /// The poll interval Core set for the agent, in seconds.
    pub polling_interval: Option<u64>,
    /// GeoDNS locations Core assigned the agent to (from its address).
    pub locations: Vec<String>,
    pub assigned_count: u64,
    /// Core's sentence about the assignment, when it made one.
    pub message: Option<String>,
}

impl fmt::Debug for Enrolment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Enrolment")
            .field("core_url", &self.core_url)
            .field("agent_id", &self.agent_id)
            .field("agent_key", &"<redacted>")
            .field("polling_interval", &self.polling_interval)
            .field("locations", &self.locations)
            .finish_non_exhaustive()
    }
}

/// Why enrolment failed. Each status Core uses has its own one-line reason.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    #[error(
        "{url:?} is not a connect URL like https://core.example.net/api/agent/connect/TOKEN: {reason}"
    )]
    BadUrl { url: String, reason: String },
    #[error("cannot reach core at {url}: {message}")]
    Transport { url: String, message: String },
    #[error("{}", status_reason(*status, core_error.as_deref(), location.as_deref()))]
    Status {
        status: u16,
        /// Core's `error` field, when it sent one.
        core_error: Option<String>,
        /// Where a redirect pointed.
        location: Option<String>,
    },
    #[error("core's answer is not a connect response: {0}")]
    BadAnswer(String),
}

fn status_reason(status: u16, core_error: Option<&str>, location: Option<&str>) -> String {
    let said = core_error.map_or(String::new(), |error| format!(" ({error:?})"));
    match status {
        400 => format!("core answered 400{said}: the connect URL has no token"),
        404 => format!(
            "core answered 404{said}: the token is unknown, expired or already used (a connect \
             URL works once); add the agent again in core to get a new one"
        ),
        409 => format!(
            "core answered 409{said}: this agent is already connected; delete it in core and add \
             it again to enrol another host"
        ),
        300..=399 => format!(
            "core answered {status} (a redirect to {}); use the URL core shows, with https",
            location.unwrap_or("nowhere")
        ),
        500..=599 => format!("core answered {status}{said}: core failed to connect the agent"),
        _ => format!("core answered HTTP {status}{said}"),
    }
}

/// Enrols at Core with `url`: one `GET`, no redirects followed, bounded by `timeout`.
/// Blocking; call it from a thread that may block.
///
/// # Errors
///
/// [`ConnectError`] with Core's status, or why Core could not be asked.
pub fn connect(url: &ConnectUrl, timeout: Duration) -> Result<Enrolment, ConnectError> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .max_redirects(0)
        .user_agent(concat!("defenra-agent/", env!("CARGO_PKG_VERSION")))
        .build()
        .into();
    let mut response = agent
        .get(&url.url)
        .header("Accept", "application/json")
        .call()
        .map_err(|error| ConnectError::Transport {
            url: url.core_url.clone(),
            message: error.to_string(),
        })?;
    let status = response.status().as_u16();
    let mut body = Vec::new();
    let _ = response
        .body_mut()
        .as_reader()
        .take(MAX_ANSWER)
        .read_to_end(&mut body);
    let answer: Option<wire::ConnectResponse> = serde_json::from_slice(&body).ok();
    if status != 200 {
        return Err(ConnectError::Status {
            status,
            core_error: answer.and_then(|answer| answer.error),
            location: response
                .headers()
                .get("location")
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned),
        });
    }
    let answer = answer.ok_or_else(|| {
        ConnectError::BadAnswer(format!(
            "not JSON: {:?}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ))
    })?;
    enrolment(url, answer)
}

/// Checks a 200 answer and takes the credentials out of it.
fn enrolment(url: &ConnectUrl, answer: wire::ConnectResponse) -> Result<Enrolment, ConnectError> {
    let wire::ConnectResponse {
        success,
        message,
        config,
        auto_assignment,
        error,
    } = answer;
    if success != Some(true) {
        return Err(ConnectError::BadAnswer(format!(
            "success is not true ({})",
            error.or(message).unwrap_or_default()
        )));
    }
    let Some(wire::ConnectConfig {
        agent_id,
        agent_key,
        polling_interval,
        api_endpoint: _,
    }) = config
    else {
        return Err(ConnectError::BadAnswer("no config".to_owned()));
    };
    let non_empty = |value: Option<String>, name: &str| {
        value
            .map(|value| value.trim().to_owned())
            .filter(|value| !value.is_empty() && !value.contains(['\n', '\r', '\0']))
            .ok_or_else(|| ConnectError::BadAnswer(format!("config.{name} is missing or unusable")))
    };
    let agent_id = non_empty(agent_id, "agentId")?;
    let agent_key = non_empty(agent_key, "agentKey")?;
    let wire::AutoAssignment {
        locations,
        assigned_count,
        message,
    } = auto_assignment.unwrap_or_default();
    Ok(Enrolment {
        core_url: url.core_url.clone(),
        agent_id,
        agent_key,
        polling_interval: polling_interval
            .filter(|seconds| seconds.is_finite() && *seconds >= 1.0)
            .map(|seconds| seconds.min(86_400.0) as u64),
        locations,
        assigned_count: assigned_count
            .filter(|count| count.is_finite() && *count >= 0.0)
            .map_or(0, |count| count as u64),
        message: message.filter(|message| !message.trim().is_empty()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_urls_give_the_core_url_and_need_a_token() {
        let url = ConnectUrl::parse(" https://core.example.net/api/agent/connect/abc123 ").unwrap();
        assert_eq!(url.core_url(), "https://core.example.net");
        let url = ConnectUrl::parse("http://10.0.0.5:3000/api/agent/connect/t").unwrap();
        assert_eq!(url.core_url(), "http://10.0.0.5:3000");
        let url = ConnectUrl::parse("https://example.net/core/api/agent/connect/t").unwrap();
        assert_eq!(url.core_url(), "https://example.net/core");
        for bad in [
            "https://core.example.net/api/agent/connect/",
            "https://core.example.net/api/agent/poll",
            "ftp://core.example.net/api/agent/connect/t",
            "core.example.net/api/agent/connect/t",
            "not a url",
        ] {
            assert!(
                matches!(ConnectUrl::parse(bad), Err(ConnectError::BadUrl { .. })),
                "{bad}"
            );
        }
        assert!(
            !format!("{url:?}").contains("/t"),
            "the token stays out of logs"
        );
    }

    #[test]
    fn each_status_has_its_own_reason() {
        let reason = |status| {
            ConnectError::Status {
                status,
                core_error: Some("x".into()),
                location: None,
            }
            .to_string()
        };
        assert!(reason(404).contains("already used"), "{}", reason(404));
        assert!(reason(409).contains("already connected"));
        assert!(reason(400).contains("no token"));
        assert!(reason(500).contains("failed to connect"));
        assert!(reason(302).contains("redirect"));
        assert!(reason(418).contains("418"));
    }

    #[test]
    fn answers_without_credentials_are_refused() {
        let url = ConnectUrl::parse("https://core/api/agent/connect/t").unwrap();
        let parse = |json: &str| enrolment(&url, serde_json::from_str(json).unwrap());
        let ok = parse(
            r#"{"success":true,"config":{"agentId":"a","agentKey":"k","pollingInterval":30},
                "autoAssignment":{"locations":["europe"],"assignedCount":2}}"#,
        )
        .unwrap();
        assert_eq!(
            (ok.agent_id.as_str(), ok.polling_interval, ok.assigned_count),
            ("a", Some(30), 2)
        );
        assert!(
            !format!("{ok:?}").contains("\"k\""),
            "the key stays out of logs"
        );
        assert!(parse(r#"{"success":true,"config":{"agentId":"a"}}"#).is_err());
        assert!(parse(r#"{"success":false,"config":{"agentId":"a","agentKey":"k"}}"#).is_err());
        assert!(parse(r#"{"success":true,"config":{"agentId":"a","agentKey":"k\nX=1"}}"#).is_err());
    }
}

//! Reports to Defenra Core: `POST /api/statistics` (one resource's traffic) and
//! `POST /api/clients` (one client address), with the agent's Bearer key.
//!
//! This module only sends what it is given; deciding what to report (deltas, which clients)
//! is the caller's. Calls are blocking (ureq); run them off the async runtime's workers.

use std::io::Read;
use std::time::Duration;

use crate::wire::{ClientReport, TrafficReport};

/// Settings for [`CoreReporter`].
#[derive(Debug, Clone)]
pub struct ReporterOptions {
    /// Base URL of Core, as for polling.
    pub url: String,
    pub agent_key: String,
    /// Bounds each request, connect to last byte.
    pub timeout: Duration,
}

/// Sends reports to Core, reusing its connections between calls. Redirects are not followed,
/// so the key goes nowhere but the configured URL.
pub struct CoreReporter {
    statistics_url: String,
    clients_url: String,
    authorization: String,
    agent: ureq::Agent,
}

/// Why a report was not taken.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    #[error("core request to {url} failed: {message}")]
    Transport { url: String, message: String },
    #[error("core answered HTTP {status} to {url}: {excerpt:?}")]
    Status {
        url: String,
        status: u16,
        excerpt: String,
    },
}

impl ReportError {
    /// Whether sending the same report again cannot help: Core refused its content (a 4xx
    /// other than 408 and 429). Transport failures and 5xx are worth another try.
    pub fn is_permanent(&self) -> bool {
        match self {
            ReportError::Transport { .. } => false,
            ReportError::Status { status, .. } => {
                (400..500).contains(status) && *status != 408 && *status != 429
            }
        }
    }

    /// Whether Core could not be reached at all (the next reports would fail the same way).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ReportError::Transport { .. })
    }
}

impl CoreReporter {
    pub fn new(options: ReporterOptions) -> Self {
        let base = options.url.trim_end_matches('/');
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(options.timeout))
            .http_status_as_error(false)
            .max_redirects(0)
            .user_agent(concat!("defenra-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        CoreReporter {
            statistics_url: format!("{base}/api/statistics"),
            clients_url: format!("{base}/api/clients"),
            authorization: format!("Bearer {}", options.agent_key),
            agent,
        }
    }

    /// `POST /api/statistics`.
    ///
    /// # Errors
    ///
    /// [`ReportError`] when Core did not answer 2xx.
    pub fn send_traffic(&self, report: &TrafficReport) -> Result<(), ReportError> {
        self.post(&self.statistics_url, report)
    }

    /// `POST /api/clients`.
    ///
    /// # Errors
    ///
    /// [`ReportError`] when Core did not answer 2xx.
    pub fn send_client(&self, report: &ClientReport) -> Result<(), ReportError> {
        self.post(&self.clients_url, report)
    }

    fn post(&self, url: &str, body: &impl serde::Serialize) -> Result<(), ReportError> {
        let transport = |message: String| ReportError::Transport {
            url: url.to_owned(),
            message,
        };
        let body = serde_json::to_string(body).map_err(|error| transport(error.to_string()))?;
        let mut response = self
            .agent
            .post(url)
            .header("Authorization", &self.authorization)
            .header("Accept", "application/json")
            .content_type("application/json")
            .send(body)
            .map_err(|error| transport(error.to_string()))?;
        let status = response.status().as_u16();
        // Read the (small) answer, so the connection can be reused.
        let mut answer = Vec::new();
        let _ = response
            .body_mut()
            .as_reader()
            .take(64 * 1024)
            .read_to_end(&mut answer);
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(ReportError::Status {
                url: url.to_owned(),
                status,
                excerpt: String::from_utf8_lossy(&answer[..answer.len().min(200)]).into_owned(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_refused_content_is_permanent() {
        let status = |status| ReportError::Status {
            url: "u".into(),
            status,
            excerpt: String::new(),
        };
        assert!(status(400).is_permanent());
        assert!(status(404).is_permanent());
        assert!(!status(429).is_permanent());
        assert!(!status(500).is_permanent());
        let transport = ReportError::Transport {
            url: "u".into(),
            message: "refused".into(),
        };
        assert!(!transport.is_permanent() && transport.is_unreachable());
    }
}

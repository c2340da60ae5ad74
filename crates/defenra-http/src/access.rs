//! Access log: one structured `tracing` line per finished request, sampled by a per-second
//! budget; answers the edge made itself carry their request id.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use defenra_shield::pages::RequestId;
use http::Method;
use http::uri::Authority;
use hyper::body::{Body, Frame, SizeHint};

use crate::body::ResponseBody;
use crate::server::Listener;
use crate::stats::HttpStats;

/// The `tracing` target of access lines, for filters (`defenra_http::access=info`).
pub const ACCESS_TARGET: &str = "defenra_http::access";

/// Whether access lines are written and how many per second at most.
#[derive(Debug)]
pub(crate) struct AccessLog {
    enabled: bool,
    max_per_second: u32,
    /// Start of the clock whose whole seconds number the budget windows.
    epoch: Instant,
    /// The current window: its second (high 32 bits) and the lines granted in it (low 32).
    window: AtomicU64,
}

impl AccessLog {
    pub(crate) fn new(enabled: bool, max_per_second: u32) -> Self {
        AccessLog {
            enabled,
            max_per_second,
            epoch: Instant::now(),
            window: AtomicU64::new(0),
        }
    }

    /// Starts the line of a request that begins now, or `None` when the log is off or this
    /// second's budget is spent (then the line is counted as suppressed). Deciding at the
    /// start spares suppressed requests the copies of host and path.
    pub(crate) fn start(
        &self,
        stats: &HttpStats,
        client: IpAddr,
        listener: Listener,
        method: &Method,
        path: &str,
    ) -> Option<Box<AccessEntry>> {
        if !self.enabled {
            return None;
        }
        let started = Instant::now();
        if !self.admit(started) {
            stats.access_log_suppressed();
            return None;
        }
        Some(Box::new(AccessEntry {
            started,
            client,
            listener,
            host: None,
            method: method.clone(),
            path: path.to_owned(),
            status: 0,
            bytes_sent: 0,
            origin: None,
            waf: WafOutcome::None,
            request_id: None,
        }))
    }

    /// Takes one line from the budget of the second `now` falls in: a lock-free counter
    /// per whole second since `epoch`.
    fn admit(&self, now: Instant) -> bool {
        let second = now.saturating_duration_since(self.epoch).as_secs() & 0xffff_ffff;
        let mut current = self.window.load(Relaxed);
        loop {
            let (window_second, granted) = (current >> 32, current & 0xffff_ffff);
            let granted = if window_second == second { granted } else { 0 };
            if granted >= u64::from(self.max_per_second) {
                return false;
            }
            let next = (second << 32) | (granted + 1);
            match self
                .window
                .compare_exchange_weak(current, next, Relaxed, Relaxed)
            {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
        }
    }
}

/// What the WAF decided for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WafOutcome {
    /// The domain has no script.
    None,
    Allow,
    Block,
}

impl WafOutcome {
    fn name(self) -> &'static str {
        match self {
            WafOutcome::None => "none",
            WafOutcome::Allow => "allow",
            WafOutcome::Block => "block",
        }
    }
}

/// The access line of one request, filled in as the request goes and written when the
/// response body is done (or dropped, when the client went away).
#[derive(Debug)]
pub(crate) struct AccessEntry {
    started: Instant,
    /// The peer, replaced by the address a trusted proxy reported when the domain says so.
    pub(crate) client: IpAddr,
    listener: Listener,
    pub(crate) host: Option<String>,
    method: Method,
    path: String,
    pub(crate) status: u16,
    pub(crate) bytes_sent: u64,
    pub(crate) origin: Option<Authority>,
    pub(crate) waf: WafOutcome,
    /// The id of the edge's own answer (also in its `X-Request-Id` and on its page).
    pub(crate) request_id: Option<RequestId>,
}

impl Drop for AccessEntry {
    fn drop(&mut self) {
        let duration_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        tracing::info!(
            target: ACCESS_TARGET,
            client = %self.client,
            listener = self.listener.name(),
            host = self.host.as_deref().unwrap_or("-"),
            method = self.method.as_str(),
            path = self.path.as_str(),
            status = self.status,
            bytes_sent = self.bytes_sent,
            duration_ms = (duration_ms * 1000.0).round() / 1000.0,
            origin = self.origin.as_ref().map_or("-", Authority::as_str),
            waf = self.waf.name(),
            request_id = self.request_id.as_ref().map_or("-", RequestId::as_str),
            "access"
        );
    }
}

/// The body hyper sends to the client: the response body plus, when the request is
/// logged, its access line, which counts the body bytes and is written when the body is
/// dropped.
pub(crate) struct ServedBody {
    inner: ResponseBody,
    entry: Option<Box<AccessEntry>>,
}

impl ServedBody {
    pub(crate) fn new(inner: ResponseBody, entry: Option<Box<AccessEntry>>) -> Self {
        ServedBody { inner, entry }
    }
}

impl Body for ServedBody {
    type Data = Bytes;
    type Error = <ResponseBody as Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let poll = Pin::new(&mut this.inner).poll_frame(cx);
        if let Some(entry) = &mut this.entry
            && let Poll::Ready(Some(Ok(frame))) = &poll
            && let Some(data) = frame.data_ref()
        {
            entry.bytes_sent += data.len() as u64;
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_caps_lines_per_second_and_counts_the_rest() {
        let log = AccessLog::new(true, 3);
        let stats = HttpStats::default();
        let ip = IpAddr::from([127, 0, 0, 1]);
        let granted = (0..10)
            .filter_map(|_| log.start(&stats, ip, Listener::Http, &Method::GET, "/"))
            .count();
        assert!((3..=6).contains(&granted), "granted {granted}");
        assert_eq!(stats.access_log_suppressed_total(), 10 - granted as u64);
    }

    #[test]
    fn budget_refills_in_the_next_second() {
        let log = AccessLog::new(true, 1);
        let now = Instant::now();
        assert!(log.admit(now));
        assert!(!log.admit(now));
        assert!(log.admit(now + std::time::Duration::from_secs(1)));
        assert!(!log.admit(now + std::time::Duration::from_secs(1)));
    }

    #[test]
    fn off_grants_nothing_and_counts_nothing() {
        let log = AccessLog::new(false, 1000);
        let stats = HttpStats::default();
        let entry = log.start(
            &stats,
            IpAddr::from([127, 0, 0, 1]),
            Listener::Https,
            &Method::GET,
            "/",
        );
        assert!(entry.is_none());
        assert_eq!(stats.access_log_suppressed_total(), 0);
    }
}

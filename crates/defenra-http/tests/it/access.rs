//! Access log lines: their fields and the per-second budget.

use std::io::Write;
use std::sync::{Arc, Mutex};

use defenra_http::{ACCESS_TARGET, HttpOptions};
use tracing_subscriber::fmt::MakeWriter;

use crate::support::{Origin, Proxy, config, eventually, get, options, proxied_domain};

/// Collects what the subscriber writes.
#[derive(Clone, Default)]
pub(crate) struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    pub(crate) fn lines(&self) -> Vec<String> {
        let bytes = self.0.lock().unwrap().clone();
        String::from_utf8_lossy(&bytes)
            .lines()
            .filter(|line| line.contains(ACCESS_TARGET))
            .map(str::to_owned)
            .collect()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;

    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

/// A subscriber for this test's thread only (the tests run on a current-thread runtime,
/// so the proxy's tasks log on it too).
pub(crate) fn capture() -> (Captured, tracing::subscriber::DefaultGuard) {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(captured.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    (captured, tracing::subscriber::set_default(subscriber))
}

fn logging(origin_port: u16, max_per_second: u32) -> HttpOptions {
    HttpOptions {
        access_log: true,
        access_log_max_per_second: max_per_second,
        ..options(origin_port)
    }
}

#[tokio::test]
async fn each_request_writes_one_line_with_its_fields() {
    let (captured, _guard) = capture();
    let origin = Origin::start().await;
    let proxy = Proxy::start_with(
        &config(vec![proxied_domain("example.com")]),
        logging(origin.addr.port(), 1000),
    )
    .await;

    let page = get(proxy.http, "WWW.example.com:80", "/page?secret=1").await;
    assert_eq!(page.status, 200, "{page:?}");
    let reply = get(proxy.http, "unknown.test", "/x").await;
    assert_eq!(reply.status, 404, "{reply:?}");

    eventually("two access lines", || {
        let count = captured.lines().len();
        async move { count == 2 }
    })
    .await;
    let lines = captured.lines();
    let proxied = &lines[0];
    for field in [
        "client=127.0.0.1",
        "listener=\"http\"",
        "host=\"www.example.com\"",
        "method=\"GET\"",
        "path=\"/page\"",
        "status=200",
        &format!("origin=\"{}\"", origin.addr),
        "waf=\"none\"",
        "duration_ms=",
    ] {
        assert!(proxied.contains(field), "{field} missing in {proxied}");
    }
    let sent = format!("bytes_sent={} ", page.body.len());
    assert!(proxied.contains(&sent), "{sent} missing in {proxied}");
    assert!(proxied.contains("request_id=\"-\""), "{proxied}");
    let refused = &lines[1];
    // The edge's own page: its request id, as the client saw it, is in the line.
    let request_id = format!("request_id=\"{}\"", reply.header("x-request-id"));
    for field in [
        "status=404",
        "host=\"unknown.test\"",
        "origin=\"-\"",
        &request_id,
    ] {
        assert!(refused.contains(field), "{field} missing in {refused}");
    }
    assert_eq!(proxy.service.stats().access_log_suppressed_total(), 0);
}

#[tokio::test]
async fn lines_past_the_budget_are_counted_not_written() {
    let (captured, _guard) = capture();
    let origin = Origin::start().await;
    let proxy = Proxy::start_with(
        &config(vec![proxied_domain("example.com")]),
        logging(origin.addr.port(), 1),
    )
    .await;

    for _ in 0..6 {
        assert_eq!(get(proxy.http, "example.com", "/").await.status, 200);
    }
    let suppressed = proxy.service.stats().access_log_suppressed_total();
    // Six requests within at most two one-second windows: one or two lines.
    assert!((4..=5).contains(&suppressed), "suppressed {suppressed}");
    eventually("the granted lines", || {
        let count = captured.lines().len() as u64;
        async move { count + suppressed == 6 }
    })
    .await;
}

#[tokio::test]
async fn off_writes_nothing() {
    let (captured, _guard) = capture();
    let origin = Origin::start().await;
    let proxy = Proxy::start(
        &config(vec![proxied_domain("example.com")]),
        origin.addr.port(),
    )
    .await;
    assert_eq!(get(proxy.http, "example.com", "/").await.status, 200);
    assert_eq!(proxy.service.stats().access_log_suppressed_total(), 0);
    assert!(captured.lines().is_empty(), "{:?}", captured.lines());
}

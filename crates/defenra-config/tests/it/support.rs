//! Shared helpers: a recording service, small documents, `eventually`.

use std::sync::Arc;
use std::time::Duration;

use defenra_config::{Issue, Reload, Snapshot};
use parking_lot::Mutex;

pub(crate) use defenra_config::testing::{Answer, FakeCore};

/// A document with one domain whose apex A record is `ip`.
pub(crate) fn doc_with_ip(ip: &str) -> String {
    format!(
        r#"{{"success":true,"timestamp":"{ip}","domains":[{{"domain":"example.com","dnsRecords":[{{"name":"@","type":"A","value":"{ip}"}}]}}]}}"#
    )
}

/// The apex A record of `example.com` in `snapshot`.
pub(crate) fn apex_ip(snapshot: &Snapshot) -> String {
    match &snapshot.domains[0].records[0].data {
        defenra_config::RecordData::A(ip) => ip.to_string(),
        other => panic!("unexpected record {other:?}"),
    }
}

/// A service that records what it was given and reports one issue per reload.
#[derive(Default)]
pub(crate) struct RecordingService {
    pub(crate) versions: Mutex<Vec<u64>>,
}

impl Reload for RecordingService {
    fn reload(&self, snapshot: &Arc<Snapshot>, issues: &mut Vec<Issue>) {
        self.versions.lock().push(snapshot.version);
        issues.push(Issue::new("domains[0].luaCode", "pretend syntax error"));
    }
}

/// Polls `condition` every 20 ms for up to 5 s.
pub(crate) async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    for _ in 0..250 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for: {what}");
}

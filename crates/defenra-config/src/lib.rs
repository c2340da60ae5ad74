//! Configuration for the Defenra edge agent: Core's JSON schema, validation, compiled
//! snapshots, and the sources that fetch documents (Defenra Core, a local file).
//!
//! This crate owns everything that knows Core's JSON field names ([`wire`]). Every other
//! crate sees only the compiled model ([`model`]). It never opens a listening socket and
//! never touches process-wide state (signals, env vars, stdout).
//!
//! Config moves in four steps:
//! 1. a [`ConfigSource`] ([`FileSource`], [`CoreSource`]) fetches bytes;
//! 2. [`compile`] turns them into a [`Snapshot`] plus a list of [`Issue`]s;
//! 3. [`SnapshotCell::publish`] stamps a version and swaps the snapshot in, and the last
//!    good document is saved by [`StateDir`];
//! 4. each service's [`Reload`] builds its own read-side view and swaps it in.
//!
//! [`ConfigLoop`] runs those steps on a timer. Start reading at [`compile`].
//!
//! Besides polling, this crate speaks Core's other agent routes: enrolment with a one-time
//! connect URL ([`enrol`]) and traffic and client reports ([`report`]).

mod cidr;
pub mod compile;
pub mod enrol;
pub mod model;
pub mod report;
mod runner;
mod source;
mod state;
pub mod stats;
#[cfg(feature = "testing")]
pub mod testing;
pub mod wire;

use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;

pub use cidr::{Cidr, CidrError, parse_cidr_list};
pub use compile::{Compiled, compile};
pub use enrol::{ConnectError, ConnectUrl, Enrolment};
pub use model::*;
pub use report::{CoreReporter, ReportError, ReporterOptions};
pub use runner::{ConfigLoop, ConfigStats, IntervalPolicy, PollOutcome};
pub use source::{
    ConfigSource, CoreSource, CoreSourceOptions, FileSource, MAX_DOCUMENT_BYTES, SourceError,
    read_document,
};
pub use state::StateDir;

/// One problem found while compiling: the JSON path of the item and what is wrong.
/// The item was left out (or a default used, as the message says); the rest loaded.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Issue {
    /// JSON path of the offending item, e.g. `domains[3].dnsRecords[1].value`.
    pub path: String,
    pub message: String,
}

impl Issue {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Issue {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Why a whole document was refused. The previous snapshot stays in force.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Rejected {
    #[error("config is not valid JSON: {0}")]
    NotJson(String),
    #[error("config is not a JSON object")]
    NotObject,
    #[error("config does not match the schema: {0}")]
    Schema(String),
    #[error("core refused the poll (success: false): {0:?}")]
    Refused(String),
}

/// Implemented by every data-plane service; called after each publish.
pub trait Reload: Send + Sync {
    /// Builds this service's read-side view of `snapshot` and swaps it in. Runs on a
    /// blocking-pool thread of the config loop (it may take seconds for a large snapshot,
    /// and no runtime worker waits for it), never on a request path, and never blocks on
    /// I/O. Problems only this
    /// service can see (a Lua syntax error, a port that cannot be bound) are pushed to
    /// `issues` with their JSON path.
    fn reload(&self, snapshot: &Arc<Snapshot>, issues: &mut Vec<Issue>);
}

/// The one pointer that holds the current snapshot. Readers never block.
#[derive(Default)]
pub struct SnapshotCell {
    current: ArcSwapOption<Snapshot>,
}

impl SnapshotCell {
    pub fn new() -> Self {
        SnapshotCell::default()
    }

    /// The current snapshot, or `None` before the first config is loaded.
    pub fn load(&self) -> Option<Arc<Snapshot>> {
        self.current.load_full()
    }

    /// Stamps `snapshot` with the next version and makes it current. The version is the
    /// previous one plus one, and at least the current Unix time in seconds, so it keeps
    /// increasing across restarts (it is used as the SOA serial).
    pub fn publish(&self, mut snapshot: Snapshot) -> Arc<Snapshot> {
        let previous = self
            .current
            .load()
            .as_ref()
            .map_or(0, |current| current.version);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs());
        snapshot.version = (previous + 1).max(now);
        let snapshot = Arc::new(snapshot);
        self.current.store(Some(Arc::clone(&snapshot)));
        snapshot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_versions_increase_and_follow_the_clock() {
        let cell = SnapshotCell::new();
        assert!(cell.load().is_none());
        let first = cell.publish(Snapshot::empty()).version;
        let second = cell.publish(Snapshot::empty()).version;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(first < second, "{first} then {second}");
        assert!(
            first >= now - 5,
            "version {first} should be at least the Unix time {now}"
        );
        assert_eq!(cell.load().unwrap().version, second);
    }
}

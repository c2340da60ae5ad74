//! The GeoIP database's life: loaded at start when it can be (a missing or unreadable file is
//! a warning, not a failure), watched like the config file, re-read on SIGHUP, replaced live
//! when a new valid file appears, kept when a replacement is corrupt.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use defenra_config::stats::{Metric, StatsSource};
use defenra_geo::{GeoDatabase, MaxMindGeo};
use parking_lot::Mutex;
use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Where the database stands, for `/health`, `/stats` and `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GeoState {
    /// No `--geoip-db`: GeoDNS answers from each domain's `default` by choice.
    Off,
    /// The file's database is in use.
    Loaded,
    /// The file does not exist (yet) and no database is in use.
    Missing,
    /// The file exists but cannot be read or is not a MaxMind database; none is in use.
    Invalid,
    /// A database is in use, but the file changed into one that cannot be used (or went
    /// away): the previous database stays until a good file appears.
    Stale,
}

impl GeoState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            GeoState::Off => "off",
            GeoState::Loaded => "loaded",
            GeoState::Missing => "missing",
            GeoState::Invalid => "invalid",
            GeoState::Stale => "stale",
        }
    }

    /// Whether the agent runs without the database it was told to use (or with an old one).
    pub(crate) fn is_degraded(self) -> bool {
        matches!(
            self,
            GeoState::Missing | GeoState::Invalid | GeoState::Stale
        )
    }
}

/// Identity of the file's content as far as `stat` can tell: a `geoipupdate` run renames a
/// new file into place (new inode), an edit in place changes the time or the length.
type Stamp = (SystemTime, u64, u64);

/// The `--geoip-db` file and the database loaded from it.
pub(crate) struct GeoIp {
    path: Option<PathBuf>,
    database: Arc<GeoDatabase>,
    status: Mutex<Status>,
    reloads: AtomicU64,
    failures: AtomicU64,
    /// Unix seconds of the last successful load (0 = never).
    loaded_at: AtomicU64,
}

struct Status {
    state: GeoState,
    /// Why the file could not be used, while it cannot.
    error: Option<String>,
    database_type: Option<String>,
    /// The stamp of the file last read (successfully or not), so an unchanged file is not
    /// read again on every check.
    stamp: Option<Stamp>,
}

impl GeoIp {
    /// Nothing loaded yet; [`GeoIp::check`] reads the file.
    pub(crate) fn new(path: Option<PathBuf>) -> Self {
        let state = if path.is_some() {
            GeoState::Missing
        } else {
            GeoState::Off
        };
        GeoIp {
            path,
            database: Arc::new(GeoDatabase::empty()),
            status: Mutex::new(Status {
                state,
                error: None,
                database_type: None,
                stamp: None,
            }),
            reloads: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            loaded_at: AtomicU64::new(0),
        }
    }

    /// The database holder the services look up in (empty until a file loads).
    pub(crate) fn database(&self) -> Arc<GeoDatabase> {
        Arc::clone(&self.database)
    }

    pub(crate) fn is_configured(&self) -> bool {
        self.path.is_some()
    }

    pub(crate) fn state(&self) -> GeoState {
        self.status.lock().state
    }

    /// Reads the file when it changed since the last read (or always, with `force`) and
    /// swaps a valid database in. Runs the read on the blocking pool.
    pub(crate) async fn check(self: &Arc<Self>, force: bool) {
        let Some(path) = self.path.clone() else {
            return;
        };
        let this = Arc::clone(self);
        let _ = tokio::task::spawn_blocking(move || this.check_blocking(&path, force)).await;
    }

    fn check_blocking(&self, path: &Path, force: bool) {
        let stamp = match std::fs::metadata(path) {
            Ok(metadata) => (
                metadata.modified().unwrap_or(UNIX_EPOCH),
                metadata.len(),
                metadata.ino(),
            ),
            Err(error) => {
                let mut status = self.status.lock();
                let (state, message) = if self.database.is_loaded() {
                    (
                        GeoState::Stale,
                        format!(
                            "the file is gone ({error}); still using the database loaded before"
                        ),
                    )
                } else if error.kind() == std::io::ErrorKind::NotFound {
                    (
                        GeoState::Missing,
                        format!("{} does not exist", path.display()),
                    )
                } else {
                    (
                        GeoState::Invalid,
                        format!("cannot read {}: {error}", path.display()),
                    )
                };
                if status.state != state || status.stamp.is_some() {
                    warn!(path = %path.display(), state = state.as_str(), "{message}; GeoDNS answers from each domain's default location and the agents list");
                }
                status.state = state;
                status.error = Some(message);
                status.stamp = None;
                return;
            }
        };
        if !force && self.status.lock().stamp == Some(stamp) {
            return;
        }
        match MaxMindGeo::open(path) {
            Ok(database) => {
                let database_type = database.database_type().to_owned();
                info!(path = %path.display(), database_type = %database_type, "GeoIP database loaded");
                self.reloads.fetch_add(1, Relaxed);
                self.loaded_at.store(unix_now(), Relaxed);
                // The status first: whoever sees answers from the new database sees it too.
                *self.status.lock() = Status {
                    state: GeoState::Loaded,
                    error: None,
                    database_type: Some(database_type),
                    stamp: Some(stamp),
                };
                self.database.replace(database);
            }
            Err(error) => {
                self.failures.fetch_add(1, Relaxed);
                let mut status = self.status.lock();
                status.stamp = Some(stamp);
                status.error = Some(error.to_string());
                if self.database.is_loaded() {
                    status.state = GeoState::Stale;
                    warn!(%error, "the GeoIP database file cannot be used; keeping the database loaded before");
                } else {
                    status.state = GeoState::Invalid;
                    warn!(%error, "the GeoIP database file cannot be used; GeoDNS answers from each domain's default location and the agents list");
                }
            }
        }
    }

    /// Checks the file every `period` and at once when `reload` is notified (SIGHUP), until
    /// `shutdown`.
    pub(crate) async fn watch(
        self: Arc<Self>,
        period: Duration,
        reload: Arc<Notify>,
        shutdown: CancellationToken,
    ) {
        if self.path.is_none() {
            return;
        }
        loop {
            let force = tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(period) => false,
                () = reload.notified() => true,
            };
            self.check(force).await;
        }
    }
}

impl StatsSource for GeoIp {
    fn service(&self) -> &'static str {
        "geoip"
    }

    fn collect(&self, out: &mut Vec<Metric>) {
        let state = self.state();
        out.extend([
            Metric::gauge(
                "database_loaded",
                "1 while a GeoIP database is in use.",
                if self.database.is_loaded() { 1.0 } else { 0.0 },
            ),
            Metric::gauge(
                "degraded",
                "1 while --geoip-db is missing, unusable, or replaced by a file that is (the \
                 previous database stays in use).",
                if state.is_degraded() { 1.0 } else { 0.0 },
            ),
            Metric::counter(
                "loads_total",
                "GeoIP database files loaded (at start and after each change).",
                self.reloads.load(Relaxed),
            ),
            Metric::counter(
                "load_failures_total",
                "GeoIP database files that could not be used.",
                self.failures.load(Relaxed),
            ),
            Metric::gauge(
                "loaded_timestamp_seconds",
                "Unix time the database in use was loaded (0 = none).",
                self.loaded_at.load(Relaxed) as f64,
            ),
        ]);
    }

    fn details(&self) -> serde_json::Value {
        let status = self.status.lock();
        json!({
            "state": status.state.as_str(),
            "path": self.path.as_ref().map(|path| path.display().to_string()),
            "database_type": status.database_type,
            "error": status.error,
        })
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use defenra_geo::GeoLookup;
    use defenra_geo::mmdb_writer::MmdbWriter;

    use super::*;

    fn write_database(path: &Path, country: &str) {
        let mut writer = MmdbWriter::new();
        writer.insert("81.0.0.0".parse().unwrap(), 8, Some(country), Some("EU"));
        // Renamed into place, as geoipupdate does.
        let temporary = path.with_extension("tmp");
        std::fs::write(&temporary, writer.to_bytes()).unwrap();
        std::fs::rename(&temporary, path).unwrap();
    }

    fn country(geoip: &GeoIp) -> Option<String> {
        let ip: IpAddr = "81.1.1.1".parse().unwrap();
        geoip
            .database()
            .locate(ip)
            .and_then(|location| location.country)
    }

    #[tokio::test]
    async fn missing_then_appearing_then_replaced_then_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("geo.mmdb");
        let geoip = Arc::new(GeoIp::new(Some(path.clone())));

        geoip.check(false).await;
        assert_eq!(geoip.state(), GeoState::Missing);
        assert_eq!(country(&geoip), None);

        write_database(&path, "DE");
        geoip.check(false).await;
        assert_eq!(geoip.state(), GeoState::Loaded);
        assert_eq!(country(&geoip).as_deref(), Some("de"));

        write_database(&path, "FR");
        geoip.check(false).await;
        assert_eq!(country(&geoip).as_deref(), Some("fr"), "replaced live");

        std::fs::write(&path, b"this is not a database").unwrap();
        geoip.check(false).await;
        assert_eq!(geoip.state(), GeoState::Stale);
        assert_eq!(
            country(&geoip).as_deref(),
            Some("fr"),
            "the previous one stays"
        );
        assert!(
            geoip.details()["error"]
                .as_str()
                .unwrap()
                .contains("geo.mmdb")
        );

        write_database(&path, "NL");
        geoip.check(false).await;
        assert_eq!(geoip.state(), GeoState::Loaded);
        assert_eq!(country(&geoip).as_deref(), Some("nl"));
        let mut metrics = Vec::new();
        geoip.collect(&mut metrics);
        let value = |name: &str| metrics.iter().find(|m| m.name == name).unwrap().value;
        assert_eq!(value("loads_total"), 3.0);
        assert_eq!(value("load_failures_total"), 1.0);
        assert_eq!(value("degraded"), 0.0);
    }

    #[tokio::test]
    async fn an_unusable_file_at_start_is_invalid_and_off_is_not_degraded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("geo.mmdb");
        std::fs::write(&path, b"garbage").unwrap();
        let geoip = Arc::new(GeoIp::new(Some(path)));
        geoip.check(false).await;
        assert_eq!(geoip.state(), GeoState::Invalid);
        assert!(geoip.state().is_degraded());
        let off = GeoIp::new(None);
        assert_eq!(off.state(), GeoState::Off);
        assert!(!off.state().is_degraded());
    }
}

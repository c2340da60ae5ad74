//! Off the request path: the ban file in the state directory, the background task that
//! sweeps expired bans and saves the list, and the budget of decision log lines.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use defenra_config::Cidr;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::{BanSource, Shield};

/// Largest ban file read at start; a bigger one is refused (the agent starts without it).
const MAX_BAN_FILE: u64 = 64 * 1024 * 1024;
/// How often expired bans are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Least time between two saves of the ban file.
const SAVE_EVERY: Duration = Duration::from_secs(1);

/// The ban file: `{"bans": [{"address", "prefix", "reason", "source", "expiresAt"}]}` with
/// `expiresAt` in Unix seconds (`null`: no expiry).
#[derive(Debug, Default, Serialize, Deserialize)]
struct BanFile {
    bans: Vec<SavedBan>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SavedBan {
    address: std::net::IpAddr,
    prefix: u8,
    reason: String,
    source: BanSource,
    expires_at: Option<u64>,
}

/// Why the ban file could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BanFileError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("{path} is larger than {MAX_BAN_FILE} bytes")]
    TooLarge { path: PathBuf },
    #[error("{path} is not a ban file: {source}")]
    Format {
        path: PathBuf,
        source: serde_json::Error,
    },
}

impl Shield {
    /// Writes the bans in force to `path` atomically (a temporary file, then a rename),
    /// readable by the owner only.
    ///
    /// # Errors
    ///
    /// The I/O error of writing or renaming.
    pub fn save_bans(&self, path: &Path) -> std::io::Result<()> {
        let now = unix_now();
        let file = BanFile {
            bans: self
                .bans()
                .into_iter()
                .map(|entry| SavedBan {
                    address: entry.cidr.addr(),
                    prefix: entry.cidr.prefix(),
                    reason: entry.reason.to_string(),
                    source: entry.source,
                    expires_at: entry.remaining.map(|left| now + left.as_secs().max(1)),
                })
                .collect(),
        };
        let bytes = serde_json::to_vec(&file).map_err(std::io::Error::other)?;
        let temporary = path.with_extension("tmp");
        {
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut out = options.open(&temporary)?;
            out.write_all(&bytes)?;
            out.sync_all()?;
        }
        std::fs::rename(&temporary, path)
    }

    /// Loads the bans saved in `path` with their remaining time; they are listed with
    /// source `state`. A missing file loads nothing. Returns how many were loaded.
    ///
    /// # Errors
    ///
    /// [`BanFileError`] when the file exists but cannot be used; no ban is loaded then.
    pub fn load_bans(&self, path: &Path) -> Result<usize, BanFileError> {
        let io = |source| BanFileError::Io {
            path: path.to_owned(),
            source,
        };
        let metadata = match std::fs::metadata(path) {
            Ok(metadata) => metadata,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(error) => return Err(io(error)),
        };
        if !metadata.is_file() {
            return Err(BanFileError::NotAFile {
                path: path.to_owned(),
            });
        }
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .map_err(io)?
            .take(MAX_BAN_FILE + 1)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        if bytes.len() as u64 > MAX_BAN_FILE {
            return Err(BanFileError::TooLarge {
                path: path.to_owned(),
            });
        }
        let file: BanFile =
            serde_json::from_slice(&bytes).map_err(|source| BanFileError::Format {
                path: path.to_owned(),
                source,
            })?;
        let now = unix_now();
        let mut loaded = 0;
        for saved in file.bans {
            let remaining = match saved.expires_at {
                Some(expires_at) if expires_at <= now => continue,
                Some(expires_at) => Some(Duration::from_secs(expires_at - now)),
                None => None,
            };
            let cidr = Cidr::new(saved.address, saved.prefix);
            if self
                .ban(cidr, remaining, &saved.reason, BanSource::State)
                .is_ok()
            {
                loaded += 1;
            }
        }
        Ok(loaded)
    }

    /// The shield's housekeeping until `shutdown`: sweeps expired bans every second and,
    /// with a `ban_file`, saves the list at most once a second after a change and once
    /// more at the end.
    pub async fn run_background(
        self: Arc<Self>,
        ban_file: Option<PathBuf>,
        shutdown: CancellationToken,
    ) {
        let mut changes = self.ban_changes();
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut dirty = false;
        let mut last_save = tokio::time::Instant::now() - SAVE_EVERY;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = sweep.tick() => {
                    if self.bans.sweep(self.clock.now_s()) > 0 {
                        dirty = true;
                    }
                }
                changed = changes.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    dirty = true;
                }
            }
            if dirty && last_save.elapsed() >= SAVE_EVERY {
                dirty = false;
                last_save = tokio::time::Instant::now();
                if let Some(path) = &ban_file {
                    self.save_in_background(path).await;
                }
            }
        }
        if let Some(path) = &ban_file {
            self.save_in_background(path).await;
        }
    }

    async fn save_in_background(self: &Arc<Self>, path: &Path) {
        let shield = Arc::clone(self);
        let path = path.to_owned();
        let saved = tokio::task::spawn_blocking(move || {
            let result = shield.save_bans(&path);
            (path, result)
        })
        .await;
        if let Ok((path, Err(error))) = saved {
            self.log_decision(|| {
                tracing::warn!(path = %path.display(), %error, "cannot save the ban list");
            });
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

/// A per-second budget of log lines for block and ban decisions.
pub(crate) struct LogBudget {
    per_second: u32,
    /// (second, lines written in it, lines suppressed since the last written one)
    state: Mutex<(u32, u32, u64)>,
}

pub(crate) enum LogTake {
    /// Write the line; first mention the lines suppressed before it.
    Write {
        suppressed: u64,
    },
    Skip,
}

impl LogBudget {
    pub(crate) fn new(per_second: u32) -> LogBudget {
        LogBudget {
            per_second,
            state: Mutex::new((0, 0, 0)),
        }
    }

    pub(crate) fn take(&self, now_s: u32) -> LogTake {
        let mut state = self.state.lock();
        if state.0 != now_s {
            state.0 = now_s;
            state.1 = 0;
        }
        if state.1 >= self.per_second {
            state.2 += 1;
            return LogTake::Skip;
        }
        state.1 += 1;
        let suppressed = std::mem::take(&mut state.2);
        LogTake::Write { suppressed }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_budget_refills_each_second_and_reports_what_it_skipped() {
        let budget = LogBudget::new(2);
        assert!(matches!(budget.take(1), LogTake::Write { suppressed: 0 }));
        assert!(matches!(budget.take(1), LogTake::Write { suppressed: 0 }));
        assert!(matches!(budget.take(1), LogTake::Skip));
        assert!(matches!(budget.take(1), LogTake::Skip));
        assert!(matches!(budget.take(2), LogTake::Write { suppressed: 2 }));
    }
}

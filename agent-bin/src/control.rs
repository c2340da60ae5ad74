//! The operator's control socket: `defenra-agent ban`, `unban` and `bans` talk to the
//! running agent over `STATE_DIR/control.sock` (mode 0600: root and the agent's user
//! only), one JSON request line and one JSON answer per connection.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use defenra_config::Cidr;
use defenra_shield::{BanSource, Shield};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The socket's file name in the state directory.
pub(crate) const SOCKET_NAME: &str = "control.sock";
/// Longest request line read.
const MAX_REQUEST: usize = 4096;
/// Time a client has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// One request on the socket.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "lowercase")]
pub(crate) enum Request {
    Ban {
        address: Cidr,
        /// `None`: until unbanned.
        seconds: Option<u64>,
        reason: String,
    },
    Unban {
        address: Cidr,
    },
    Bans,
}

/// Binds `STATE_DIR/control.sock` (replacing a stale socket) with mode 0600.
///
/// # Errors
///
/// When the socket cannot be created.
pub(crate) fn bind(state_dir: &Path) -> anyhow::Result<(UnixListener, PathBuf)> {
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("cannot create the state directory {}", state_dir.display()))?;
    let path = state_dir.join(SOCKET_NAME);
    // A socket left by an agent that did not stop cleanly; nothing else is named so.
    if std::fs::symlink_metadata(&path)
        .is_ok_and(|metadata| std::os::unix::fs::FileTypeExt::is_socket(&metadata.file_type()))
    {
        let _ = std::fs::remove_file(&path);
    }
    let listener = UnixListener::bind(&path)
        .with_context(|| format!("cannot create the control socket {}", path.display()))?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .with_context(|| format!("cannot restrict {}", path.display()))?;
    Ok((listener, path))
}

/// Answers requests on `listener` until `shutdown`, then removes the socket file.
pub(crate) async fn serve(
    listener: UnixListener,
    path: PathBuf,
    shield: Arc<Shield>,
    shutdown: CancellationToken,
) {
    info!(socket = %path.display(), "control socket listening");
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    warn!(%error, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let shield = Arc::clone(&shield);
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            let mut reader = BufReader::new(read).take(MAX_REQUEST as u64);
            let answer = match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line))
                .await
            {
                Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
                    Ok(request) => handle(&shield, request),
                    Err(error) => json!({"ok": false, "error": format!("bad request: {error}")}),
                },
                _ => return,
            };
            let mut bytes = answer.to_string().into_bytes();
            bytes.push(b'\n');
            let _ = write.write_all(&bytes).await;
        });
    }
    let _ = std::fs::remove_file(&path);
}

fn handle(shield: &Shield, request: Request) -> Value {
    match request {
        Request::Ban {
            address,
            seconds,
            reason,
        } => {
            let duration = seconds.map(Duration::from_secs);
            match shield.ban(address, duration, &reason, BanSource::Operator) {
                Ok(_) => {
                    info!(%address, ?duration, %reason, "banned by the operator");
                    json!({"ok": true, "message": format!("{address} banned")})
                }
                Err(error) => json!({"ok": false, "error": error.to_string()}),
            }
        }
        Request::Unban { address } => {
            if shield.unban(&address) {
                info!(%address, "unbanned by the operator");
                json!({"ok": true, "message": format!("{address} unbanned")})
            } else {
                json!({"ok": false, "error": format!("{address} is not banned (give it exactly as banned)")})
            }
        }
        Request::Bans => {
            let mut answer = bans_json(shield);
            answer["ok"] = json!(true);
            answer
        }
    }
}

/// The bans in force as `GET /banned-ips` shows them.
pub(crate) fn bans_json(shield: &Shield) -> Value {
    let now = SystemTime::now();
    let bans: Vec<Value> = shield
        .bans()
        .into_iter()
        .map(|ban| {
            json!({
                "address": ban.cidr.addr().to_string(),
                "prefix": ban.cidr.prefix(),
                "reason": &*ban.reason,
                "source": ban.source.as_str(),
                "expiresAt": ban.remaining.map(|left| rfc3339(now + left)),
                "remainingSeconds": ban.remaining.map(|left| left.as_secs()),
            })
        })
        .collect();
    json!({ "bans": bans })
}

/// Sends `request` to the agent whose state directory is `state_dir`; the answer's JSON.
///
/// # Errors
///
/// When the agent cannot be reached or answers with something that is not JSON.
pub(crate) fn call(state_dir: &Path, request: &Request) -> anyhow::Result<Value> {
    use std::io::{BufRead, Write};
    let path = state_dir.join(SOCKET_NAME);
    let mut stream = std::os::unix::net::UnixStream::connect(&path).with_context(|| {
        format!(
            "cannot reach the agent at {} (is it running with --state-dir {}?)",
            path.display(),
            state_dir.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut answer = String::new();
    std::io::BufReader::new(stream).read_line(&mut answer)?;
    serde_json::from_str(&answer).context("the agent's answer is not JSON")
}

/// `2026-12-06T22:00:53Z`.
fn rfc3339(time: SystemTime) -> String {
    let seconds = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, second_of_day) = ((seconds / 86_400) as i64, seconds % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        second_of_day / 3600,
        second_of_day % 3600 / 60,
        second_of_day % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_of_known_instants() {
        let at = |seconds| UNIX_EPOCH + Duration::from_secs(seconds);
        assert_eq!(rfc3339(at(0)), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(at(951_782_400)), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(at(1_796_594_453)), "2026-12-06T22:00:53Z");
    }
}

//! Mirrors the ban list into nftables, so the kernel drops banned sources before the
//! agent ever accepts them.
//!
//! The agent owns one table, `inet defenra` by default, with an interval set per family
//! (`banned4`, `banned6`, elements with their remaining time as timeouts) and an input
//! chain that drops their sources. Changes go to `nft -f -` in batches off the request
//! path; a batch that fails (an element that timed out in the kernel meanwhile, say) is
//! followed by a full resynchronisation. The agent's own accept check stays in force, so a
//! moment between the two never lets a banned client through. The table is left in place
//! when the agent stops: its elements time out on their own, and the next start
//! resynchronises it.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use defenra_config::Cidr;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use crate::Shield;
use crate::cidrset::CidrSet;

/// Where and how the mirror works.
#[derive(Debug, Clone)]
pub struct NftOptions {
    /// The `nft` command.
    pub nft: PathBuf,
    /// The agent's table in the `inet` family.
    pub table: String,
    /// Least time between two batches: changes within it go out together.
    pub batch_every: Duration,
    /// A full comparison this often even without changes (expired prefixes may uncover
    /// addresses banned for longer).
    pub resync_every: Duration,
}

impl Default for NftOptions {
    fn default() -> Self {
        NftOptions {
            nft: PathBuf::from("nft"),
            table: "defenra".to_owned(),
            batch_every: Duration::from_millis(100),
            resync_every: Duration::from_secs(10),
        }
    }
}

/// Why the mirror could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NftError {
    #[error("cannot run {command}: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("nft refused the ruleset: {0}")]
    Refused(String),
}

/// Keeps the kernel's sets equal to the shield's bans until `shutdown`.
///
/// # Errors
///
/// When the table cannot be created at start (no `nft`, no CAP_NET_ADMIN). Later failures
/// are logged and retried by resynchronising.
pub async fn mirror(
    shield: Arc<Shield>,
    options: NftOptions,
    shutdown: CancellationToken,
) -> Result<(), NftError> {
    let table = &options.table;
    run_nft(&options, &setup_script(table)).await?;
    tracing::info!(table = %format!("inet {table}"), "nftables ban mirror ready");
    let mut changes = shield.ban_changes();
    let mut resync = tokio::time::interval(options.resync_every);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // What the kernel holds, as far as we know: prefix → expiry (clock second, None: never).
    let mut mirrored: Option<HashMap<Cidr, Option<u32>>> = None;
    loop {
        let full = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            changed = changes.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                false
            }
            _ = resync.tick() => true,
        };
        // Let a burst of changes gather into one batch.
        tokio::time::sleep(options.batch_every).await;
        changes.borrow_and_update();
        let now_s = shield.clock.now_s();
        let desired = kernel_view(&shield, now_s);
        let script = match (&mirrored, full) {
            (Some(current), false) => diff_script(table, current, &desired, now_s),
            _ => full_script(table, &desired, now_s),
        };
        if script.is_empty() {
            continue;
        }
        match run_nft(&options, &script).await {
            Ok(()) => mirrored = Some(desired),
            Err(error) => {
                tracing::warn!(%error, "nftables batch failed; resynchronising");
                mirrored = None;
                let script = full_script(table, &desired, now_s);
                match run_nft(&options, &script).await {
                    Ok(()) => mirrored = Some(desired),
                    Err(error) => tracing::warn!(%error, "nftables resynchronisation failed"),
                }
            }
        }
    }
}

/// The bans as the kernel should hold them: prefixes that lie inside another ban are left
/// out (interval sets refuse overlaps; the agent's own check still sees them).
fn kernel_view(shield: &Shield, now_s: u32) -> HashMap<Cidr, Option<u32>> {
    let mut bans = shield.bans();
    // Widest first, so a covered prefix finds its cover already kept.
    bans.sort_by_key(|ban| ban.cidr.prefix());
    let mut kept = CidrSet::new();
    let mut view = HashMap::with_capacity(bans.len());
    for ban in bans {
        if kept.contains(ban.cidr.addr()) {
            continue;
        }
        kept.insert(ban.cidr);
        let expires = ban
            .remaining
            .map(|left| now_s.saturating_add(left.as_secs().max(1) as u32));
        view.insert(ban.cidr, expires);
    }
    view
}

fn setup_script(table: &str) -> String {
    format!(
        "add table inet {table}\n\
         add set inet {table} banned4 {{ type ipv4_addr; flags interval, timeout; }}\n\
         add set inet {table} banned6 {{ type ipv6_addr; flags interval, timeout; }}\n\
         add chain inet {table} input {{ type filter hook input priority filter - 10; policy accept; }}\n\
         flush chain inet {table} input\n\
         add rule inet {table} input ip saddr @banned4 drop\n\
         add rule inet {table} input ip6 saddr @banned6 drop\n"
    )
}

/// Empties both sets and adds every ban, in one transaction.
fn full_script(table: &str, desired: &HashMap<Cidr, Option<u32>>, now_s: u32) -> String {
    let mut script = format!("flush set inet {table} banned4\nflush set inet {table} banned6\n");
    let adds: Vec<(&Cidr, &Option<u32>)> = desired.iter().collect();
    push_elements(&mut script, "add", table, &adds, now_s);
    script
}

/// Adds what is new (or now lasts longer or shorter), deletes what was lifted. An element
/// whose kernel timeout is about to run out is not deleted: the kernel may drop it first,
/// and deleting a missing element fails the whole batch.
fn diff_script(
    table: &str,
    current: &HashMap<Cidr, Option<u32>>,
    desired: &HashMap<Cidr, Option<u32>>,
    now_s: u32,
) -> String {
    let mut deletes: Vec<(&Cidr, &Option<u32>)> = Vec::new();
    let mut adds: Vec<(&Cidr, &Option<u32>)> = Vec::new();
    for (cidr, expires) in current {
        let live = expires.is_none_or(|expires| expires > now_s.saturating_add(2));
        match desired.get(cidr) {
            None if live => deletes.push((cidr, expires)),
            Some(wanted) if wanted != expires && live => {
                // A changed timeout: replace the element.
                deletes.push((cidr, expires));
                adds.push((cidr, wanted));
            }
            Some(wanted) if wanted != expires => adds.push((cidr, wanted)),
            _ => {}
        }
    }
    for (cidr, expires) in desired {
        if !current.contains_key(cidr) {
            adds.push((cidr, expires));
        }
    }
    let mut script = String::new();
    push_elements(&mut script, "delete", table, &deletes, now_s);
    push_elements(&mut script, "add", table, &adds, now_s);
    script
}

/// `{verb} element inet TABLE SET { a timeout 600s, b, ... }`, 500 elements a line.
fn push_elements(
    script: &mut String,
    verb: &str,
    table: &str,
    elements: &[(&Cidr, &Option<u32>)],
    now_s: u32,
) {
    for (set, v4) in [("banned4", true), ("banned6", false)] {
        let family: Vec<_> = elements
            .iter()
            .filter(|(cidr, _)| matches!(cidr.addr(), IpAddr::V4(_)) == v4)
            .collect();
        for chunk in family.chunks(500) {
            let _ = write!(script, "{verb} element inet {table} {set} {{ ");
            for (index, (cidr, expires)) in chunk.iter().enumerate() {
                if index > 0 {
                    script.push_str(", ");
                }
                if cidr.is_host() {
                    let _ = write!(script, "{}", cidr.addr());
                } else {
                    let _ = write!(script, "{cidr}");
                }
                if verb == "add"
                    && let Some(expires) = expires
                {
                    let _ = write!(script, " timeout {}s", expires.saturating_sub(now_s).max(1));
                }
            }
            script.push_str(" }\n");
        }
    }
}

async fn run_nft(options: &NftOptions, script: &str) -> Result<(), NftError> {
    let command = format!("{} -f -", options.nft.display());
    let mut child = tokio::process::Command::new(&options.nft)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| NftError::Spawn {
            command: command.clone(),
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .await
            .map_err(|source| NftError::Spawn {
                command: command.clone(),
                source,
            })?;
    }
    let output = child
        .wait_with_output()
        .await
        .map_err(|source| NftError::Spawn { command, source })?;
    if output.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        Err(NftError::Refused(
            stderr.lines().next().unwrap_or("no message").to_owned(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(text: &str) -> Cidr {
        text.parse().unwrap()
    }

    #[test]
    fn diff_adds_new_deletes_lifted_and_leaves_expiring_ones() {
        let current = HashMap::from([
            (cidr("10.0.0.1"), Some(100)),
            (cidr("10.0.0.2"), Some(11)),
            (cidr("10.0.0.3"), None),
        ]);
        let desired = HashMap::from([(cidr("10.0.0.3"), None), (cidr("2001:db8::/32"), Some(70))]);
        let script = diff_script("defenra", &current, &desired, 10);
        assert!(
            script.contains("delete element inet defenra banned4 { 10.0.0.1 }"),
            "{script}"
        );
        assert!(!script.contains("10.0.0.2"), "about to time out: {script}");
        assert!(
            script.contains("add element inet defenra banned6 { 2001:db8::/32 timeout 60s }"),
            "{script}"
        );
        assert_eq!(diff_script("defenra", &desired, &desired, 10), "");
    }

    #[test]
    fn covered_prefixes_stay_out_of_the_kernel_view() {
        let shield = Shield::new(crate::ShieldOptions::default());
        for (text, reason) in [
            ("10.0.0.0/8", "net"),
            ("10.1.2.3", "host"),
            ("11.0.0.1", "other"),
        ] {
            shield
                .ban(cidr(text), None, reason, crate::BanSource::Operator)
                .unwrap();
        }
        let view = kernel_view(&shield, shield.clock.now_s());
        let mut kept: Vec<String> = view.keys().map(ToString::to_string).collect();
        kept.sort();
        assert_eq!(kept, ["10.0.0.0/8", "11.0.0.1/32"]);
        let script = full_script("t", &view, 1);
        assert!(script.starts_with("flush set inet t banned4\nflush set inet t banned6\n"));
        assert!(script.contains("10.0.0.0/8") && script.contains("11.0.0.1"));
    }
}

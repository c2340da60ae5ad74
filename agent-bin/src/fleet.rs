//! The fleet flags (`--redis-url`, `--redis-cluster`, ...) and building the agent's
//! [`Fleet`] from them (docs/shield.md, "Fleet").

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use defenra_fleet::{Fleet, FleetOptions, RedisTarget};
use defenra_shield::{Shield, ShieldKey};
use defenra_waf::WafEngine;
use tracing::info;

/// Fleet-wide protection state over Redis (docs/shield.md, "Fleet").
#[derive(Debug, Clone, Args)]
pub(crate) struct FleetArgs {
    /// Share bans, the challenge key, `ngx.shared.fleet` (and with --fleet-limits the rate
    /// limits) with the other agents through this Redis or Valkey:
    /// `redis://[user:password@]host[:port][/db]`, or `rediss://...` for TLS.
    #[arg(
        long = "redis-url",
        env = "REDIS_URL",
        value_name = "URL",
        hide_env_values = true,
        conflicts_with = "redis_cluster"
    )]
    pub(crate) redis_url: Option<String>,

    /// As --redis-url, for a Redis Cluster: some of its nodes' URLs (comma-separated).
    #[arg(
        long = "redis-cluster",
        env = "REDIS_CLUSTER",
        value_name = "URL,...",
        hide_env_values = true
    )]
    pub(crate) redis_cluster: Option<String>,

    /// Prefix of the fleet's Redis keys and channel; the same on every agent of a fleet
    /// (no braces).
    #[arg(
        long = "redis-prefix",
        env = "REDIS_PREFIX",
        default_value = "defenra:"
    )]
    pub(crate) redis_prefix: String,

    /// With Redis: rate limits and blocks count fleet-wide (each agent merges the others'
    /// requests every --fleet-sync-interval).
    #[arg(long = "fleet-limits", env = "FLEET_LIMITS")]
    pub(crate) fleet_limits: bool,

    /// How often agents exchange request counts, blocks and `ngx.shared.fleet` changes
    /// (bans go at once): 10ms-10s.
    #[arg(
        long = "fleet-sync-interval",
        env = "FLEET_SYNC_INTERVAL",
        value_name = "DURATION",
        default_value = "250ms",
        value_parser = parse_sync_interval
    )]
    pub(crate) sync_interval: Duration,
}

impl FleetArgs {
    /// The Redis the flags name, if any.
    ///
    /// # Errors
    ///
    /// A URL that is not a Redis URL (the message hides its password; clap would print it).
    pub(crate) fn target(&self) -> anyhow::Result<Option<RedisTarget>> {
        if let Some(url) = &self.redis_url {
            return Ok(Some(
                RedisTarget::single(url)
                    .map_err(|error| anyhow::anyhow!("--redis-url: {error}"))?,
            ));
        }
        match &self.redis_cluster {
            Some(urls) => Ok(Some(
                RedisTarget::cluster(urls.split(','))
                    .map_err(|error| anyhow::anyhow!("--redis-cluster: {error}"))?,
            )),
            None => Ok(None),
        }
    }
}

/// The agent's fleet membership, when the flags name a Redis: `seed_key` is the key the
/// shield starts with, and `owned_key_file` the state directory's key file (never an
/// operator's `--shield-key-file`), which is rewritten with the fleet's key.
///
/// # Errors
///
/// A bad `--redis-cluster` URL or a `--redis-prefix` with braces.
pub(crate) fn build(
    args: &FleetArgs,
    shield: &Arc<Shield>,
    waf: &Arc<WafEngine>,
    seed_key: ShieldKey,
    owned_key_file: Option<PathBuf>,
) -> anyhow::Result<Option<Arc<Fleet>>> {
    let Some(target) = args.target()? else {
        return Ok(None);
    };
    let mut options = FleetOptions::new(target);
    options.prefix = args.redis_prefix.clone();
    options.limits = args.fleet_limits;
    options.sync_interval = args.sync_interval;
    options.seed_key = Some(seed_key);
    options.owned_key_file = owned_key_file;
    let redis = options.target.display();
    let fleet = Fleet::new(options, Arc::clone(shield), Some(Arc::clone(waf)))
        .map_err(|error| anyhow::anyhow!("{error}"))?;
    info!(
        %redis,
        prefix = %args.redis_prefix,
        limits = args.fleet_limits,
        sync_interval = ?args.sync_interval,
        "fleet: sharing protection state through Redis"
    );
    Ok(Some(fleet))
}

fn parse_sync_interval(text: &str) -> Result<Duration, String> {
    let interval = crate::cli::parse_duration(text)?;
    if (Duration::from_millis(10)..=Duration::from_secs(10)).contains(&interval) {
        Ok(interval)
    } else {
        Err(format!("{text:?} must be between 10ms and 10s"))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::cli::Cli;

    #[test]
    fn fleet_flags_parse_and_check_urls() {
        let args = Cli::try_parse_from(["defenra-agent"]).unwrap().run.fleet;
        assert!(args.target().unwrap().is_none());
        assert_eq!(args.sync_interval, std::time::Duration::from_millis(250));
        assert_eq!(args.redis_prefix, "defenra:");
        let args = Cli::try_parse_from([
            "defenra-agent",
            "--redis-url",
            "redis://agent:pw@10.0.0.5:6380/1",
            "--fleet-limits",
            "--fleet-sync-interval",
            "100ms",
        ])
        .unwrap()
        .run
        .fleet;
        assert_eq!(
            args.target().unwrap().unwrap().display(),
            "redis://agent:***@10.0.0.5:6380/1"
        );
        assert!(args.fleet_limits);
        let cluster = Cli::try_parse_from([
            "defenra-agent",
            "--redis-cluster",
            "redis://a:7000,redis://b:7001",
        ])
        .unwrap()
        .run
        .fleet;
        assert!(matches!(
            cluster.target().unwrap(),
            Some(defenra_fleet::RedisTarget::Cluster(nodes)) if nodes.len() == 2
        ));
        for bad in [
            vec!["--fleet-sync-interval", "1ms"],
            vec!["--redis-url", "redis://a", "--redis-cluster", "redis://b"],
        ] {
            let mut argv = vec!["defenra-agent"];
            argv.extend(bad.iter());
            assert!(Cli::try_parse_from(&argv).is_err(), "{bad:?}");
        }
        let bad = Cli::try_parse_from(["defenra-agent", "--redis-url", "http://u:secret@h"])
            .unwrap()
            .run
            .fleet;
        let error = format!("{:#}", bad.target().unwrap_err());
        assert!(error.starts_with("--redis-url: "), "{error}");
        assert!(!error.contains("secret"), "{error}");
    }
}

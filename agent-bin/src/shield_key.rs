//! The shield key the browser challenge signs with: `--shield-key-file`, else `shield.key`
//! in the state directory (created on first start), else a random key for this process;
//! re-read on SIGHUP so a replaced file rotates it.

use std::path::{Path, PathBuf};

use anyhow::Context;
use defenra_shield::challenge::Fingerprint;
use defenra_shield::{Shield, ShieldKey};
use tracing::{info, warn};

/// The key's file in the state directory.
const KEY_FILE: &str = "shield.key";

/// The key to start with, and the file to re-read on SIGHUP (none for a process key).
///
/// # Errors
///
/// A key file that cannot be read or is not a key (the agent does not start: a fleet with
/// one odd key would refuse the others' cookies), or a state directory where none can be
/// created.
pub(crate) fn load(
    key_file: Option<&Path>,
    state_dir: Option<&Path>,
) -> anyhow::Result<(ShieldKey, Option<PathBuf>)> {
    if let Some(path) = key_file {
        let key = ShieldKey::read(path).context("--shield-key-file")?;
        info!(path = %path.display(), key = %key.fingerprint(), "shield key loaded");
        return Ok((key, Some(path.to_owned())));
    }
    if let Some(dir) = state_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the state directory {}", dir.display()))?;
        let path = dir.join(KEY_FILE);
        let key = ShieldKey::load_or_create(&path)?;
        info!(path = %path.display(), key = %key.fingerprint(), "shield key loaded");
        return Ok((key, Some(path)));
    }
    let key = ShieldKey::generate()?;
    warn!(
        key = %key.fingerprint(),
        "no --shield-key-file and no --state-dir: a random shield key for this process; \
         clearance cookies end with it and other agents do not accept them"
    );
    Ok((key, None))
}

/// Re-reads the key file (SIGHUP): when its key differs from the one it held before
/// (`last`, updated), the new key signs from now on and the previous one stays accepted for
/// the longest clearance lifetime of the config; the new key is returned (with a fleet, a
/// changed file is a fleet-wide rotation). An unchanged file changes nothing, even when the
/// shield signs with the fleet's key instead. A file that cannot be read leaves the current
/// key in place.
pub(crate) fn reread(path: &Path, shield: &Shield, last: &mut Fingerprint) -> Option<ShieldKey> {
    match ShieldKey::read(path) {
        Ok(key) => {
            if key.fingerprint() == *last {
                return None;
            }
            *last = key.fingerprint();
            let previous = shield.keys().current();
            if !shield.rotate_key(&key) {
                return None;
            }
            let keys = shield.keys();
            let until = keys.previous().map_or(0, |(_, until)| until);
            info!(
                key = %key.fingerprint(),
                %previous,
                previous_accepted_until = until,
                "shield key rotated"
            );
            Some(key)
        }
        Err(error) => {
            warn!(%error, "shield key not re-read; the current key stays");
            None
        }
    }
}

//! Enrolment with Core's one-time connect URL: the `connect` command, which writes the
//! credentials into the env file, and the same at start when `CONNECT_URL` is set and no key
//! is known yet (the credentials are then kept in the state dir).

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use defenra_config::{ConnectUrl, Enrolment, enrol};
use tracing::info;

/// How long the connect request may take, connect to last byte.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Where an enrolment made at start keeps its credentials, inside `--state-dir`.
const ENROLLED_FILE: &str = "agent.env";

/// Credentials to poll Core with.
pub(crate) struct Credentials {
    pub(crate) core_url: String,
    pub(crate) agent_id: String,
    pub(crate) agent_key: String,
}

/// `defenra-agent connect URL [--env-file PATH]`. Prints what Core assigned and the next
/// step; on any failure one line on stderr and exit status 1, with the env file untouched.
pub(crate) fn connect_command(url: &str, env_file: &Path) -> ExitCode {
    let fail = |message: String| {
        eprintln!("defenra-agent connect: {message}");
        ExitCode::FAILURE
    };
    let url = match ConnectUrl::parse(url) {
        Ok(url) => url,
        Err(error) => return fail(error.to_string()),
    };
    // Everything that can fail locally is checked before the one-time token is spent.
    let current = match prepare_env_file(env_file) {
        Ok(current) => current,
        Err(error) => return fail(error),
    };
    let enrolment = match enrol::connect(&url, CONNECT_TIMEOUT) {
        Ok(enrolment) => enrolment,
        Err(error) => return fail(error.to_string()),
    };
    let polling_interval = enrolment
        .polling_interval
        .map(|seconds| seconds.to_string());
    let mut pairs = vec![
        ("CORE_URL", enrolment.core_url.as_str()),
        ("AGENT_ID", enrolment.agent_id.as_str()),
        ("AGENT_KEY", enrolment.agent_key.as_str()),
    ];
    if let Some(seconds) = &polling_interval {
        pairs.push(("POLLING_INTERVAL", seconds));
    }
    let updated = update_env(&current, &pairs);
    if let Err(error) = write_atomically(env_file, updated.as_bytes()) {
        // The token is spent: the credentials exist only here now.
        return fail(format!(
            "core enrolled the agent, but {} cannot be written ({error}); add these lines to it \
             by hand:\n{}",
            env_file.display(),
            update_env("", &pairs).trim_end()
        ));
    }
    println!(
        "connected to {} as agent {}",
        enrolment.core_url, enrolment.agent_id
    );
    println!("{}", assignment_line(&enrolment));
    println!(
        "wrote {} to {}",
        pairs
            .iter()
            .map(|(name, _)| *name)
            .collect::<Vec<_>>()
            .join(", "),
        env_file.display()
    );
    println!("next: systemctl restart defenra-agent");
    ExitCode::SUCCESS
}

/// The credentials for a start with `CONNECT_URL` and no key: those of an earlier enrolment
/// kept in `state_dir`, or a new enrolment (saved there first, so a restart does not try
/// the spent token again).
///
/// # Errors
///
/// No state dir, an unreadable saved file, or Core refusing the enrolment.
pub(crate) fn enrol_at_start(
    connect_url: &str,
    state_dir: Option<&Path>,
) -> anyhow::Result<Credentials> {
    let state_dir = state_dir.context(
        "CONNECT_URL needs --state-dir (STATE_DIR) to keep the credentials Core hands out",
    )?;
    let saved_path = state_dir.join(ENROLLED_FILE);
    if let Some(saved) = read_env_file(&saved_path)
        .with_context(|| format!("cannot read {}", saved_path.display()))?
        && let (Some(core_url), Some(agent_id), Some(agent_key)) = (
            saved.get("CORE_URL"),
            saved.get("AGENT_ID"),
            saved.get("AGENT_KEY"),
        )
    {
        info!(path = %saved_path.display(), agent_id = %agent_id, "using the credentials of the earlier enrolment");
        return Ok(Credentials {
            core_url: core_url.clone(),
            agent_id: agent_id.clone(),
            agent_key: agent_key.clone(),
        });
    }
    let url = ConnectUrl::parse(connect_url)?;
    fs::create_dir_all(state_dir)
        .with_context(|| format!("cannot create the state dir {}", state_dir.display()))?;
    prepare_env_file(&saved_path).map_err(anyhow::Error::msg)?;
    info!(core = url.core_url(), "enrolling with the connect URL");
    let enrolment = enrol::connect(&url, CONNECT_TIMEOUT).context("enrolment failed")?;
    let pairs = [
        ("CORE_URL", enrolment.core_url.as_str()),
        ("AGENT_ID", enrolment.agent_id.as_str()),
        ("AGENT_KEY", enrolment.agent_key.as_str()),
    ];
    write_atomically(&saved_path, update_env("", &pairs).as_bytes()).with_context(|| {
        format!(
            "core enrolled agent {} but {} cannot be written",
            enrolment.agent_id,
            saved_path.display()
        )
    })?;
    info!(
        agent_id = %enrolment.agent_id,
        locations = %enrolment.locations.join(","),
        path = %saved_path.display(),
        "enrolled"
    );
    Ok(Credentials {
        core_url: enrolment.core_url,
        agent_id: enrolment.agent_id,
        agent_key: enrolment.agent_key,
    })
}

fn assignment_line(enrolment: &Enrolment) -> String {
    match (&enrolment.message, enrolment.locations.is_empty()) {
        (Some(message), _) => format!("core: {message}"),
        (None, true) => "core assigned the agent to no GeoDNS location".to_owned(),
        (None, false) => format!(
            "core assigned the agent to {}",
            enrolment.locations.join(", ")
        ),
    }
}

/// The env file's current text (empty when it does not exist yet), after checking that it
/// can be replaced: its directory exists and takes a new file.
fn prepare_env_file(path: &Path) -> Result<String, String> {
    let current = match fs::read(path) {
        Ok(bytes) => String::from_utf8(bytes)
            .map_err(|_| format!("{} is not a text file", path.display()))?,
        Err(error) if error.kind() == io::ErrorKind::NotFound => String::new(),
        Err(error) => return Err(format!("cannot read {}: {error}", path.display())),
    };
    let probe = sibling(path, "probe")?;
    let created = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&probe);
    match created {
        Ok(_) => {
            let _ = fs::remove_file(&probe);
            Ok(current)
        }
        Err(error) => Err(format!(
            "cannot write next to {} ({error}); run as root, or pass --env-file",
            path.display()
        )),
    }
}

/// A hidden file next to `path` (after following a symlink), for a temporary copy.
fn sibling(path: &Path, what: &str) -> Result<PathBuf, String> {
    let target = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let name = target
        .file_name()
        .ok_or_else(|| format!("{} names no file", path.display()))?
        .to_string_lossy()
        .into_owned();
    Ok(target.with_file_name(format!(".{name}.{what}-{}", std::process::id())))
}

/// Replaces `path` with `content` atomically, with mode 0600: a temporary file beside it,
/// fsynced, renamed over it, then the directory fsynced. The owner of an existing file is
/// kept. On failure `path` is untouched.
fn write_atomically(path: &Path, content: &[u8]) -> io::Result<()> {
    let target = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let temporary = sibling(path, "tmp").map_err(io::Error::other)?;
    let owner = fs::metadata(&target)
        .ok()
        .map(|metadata| (metadata.uid(), metadata.gid()));
    let _ = fs::remove_file(&temporary);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary)?;
        // The mode asked for above is reduced by the umask; set it exactly.
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
        if let Some((uid, gid)) = owner {
            // Only root can give a file away; anyone else keeps their own.
            let _ = std::os::unix::fs::fchown(&file, Some(uid), Some(gid));
        }
        file.write_all(content)?;
        file.sync_all()?;
        fs::rename(&temporary, &target)?;
        if let Some(dir) = target.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            let _ = File::open(dir).and_then(|dir| dir.sync_all());
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    result
}

/// `content` with each `(name, value)` set: the first assignment of `name` is replaced in
/// place, later ones (which would override it) are dropped, and a name not assigned yet is
/// appended. Comments, blank lines and other variables stay as they are.
fn update_env(content: &str, pairs: &[(&str, &str)]) -> String {
    let mut written: Vec<&str> = Vec::new();
    let mut out = String::with_capacity(content.len() + 256);
    for line in content.lines() {
        match assigned_name(line).and_then(|name| pairs.iter().find(|(key, _)| *key == name)) {
            Some((name, value)) => {
                if !written.contains(name) {
                    out.push_str(&format!("{name}={}\n", quote(value)));
                    written.push(name);
                }
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    for (name, value) in pairs {
        if !written.contains(name) {
            out.push_str(&format!("{name}={}\n", quote(value)));
        }
    }
    out
}

/// The variable a line assigns (`NAME=...` or `export NAME=...`), if it is an assignment.
fn assigned_name(line: &str) -> Option<&str> {
    let line = line.trim_start();
    let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
    let (name, _) = line.split_once('=')?;
    let name = name.trim_end();
    (!name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        .then_some(name)
}

/// A value as systemd's `EnvironmentFile=` reads it back: bare when it is plain, else in
/// double quotes with `\` and `"` escaped.
fn quote(value: &str) -> String {
    let plain = value
        .bytes()
        .all(|b| b.is_ascii_graphic() && !matches!(b, b'"' | b'\'' | b'\\' | b'#' | b'$' | b'`'));
    if plain && !value.is_empty() {
        value.to_owned()
    } else {
        format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

/// The assignments of an env file (`None` when it does not exist), unquoted.
fn read_env_file(path: &Path) -> io::Result<Option<HashMap<String, String>>> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    let mut values = HashMap::new();
    for line in text.lines() {
        let Some(name) = assigned_name(line) else {
            continue;
        };
        let Some((_, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim();
        let value = match value
            .strip_prefix('"')
            .and_then(|rest| rest.strip_suffix('"'))
        {
            Some(inner) => inner.replace("\\\"", "\"").replace("\\\\", "\\"),
            None => value.to_owned(),
        };
        if !value.is_empty() {
            values.insert(name.to_owned(), value);
        }
    }
    Ok(Some(values))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignments_are_replaced_in_place_and_everything_else_is_kept() {
        let before = "# comment\nCORE_URL=https://old\nAGENT_KEY=\n\n# AGENT_ID=commented\n\
                      DNS_LISTEN=:53\nexport AGENT_KEY=stale\n";
        let after = update_env(
            before,
            &[
                ("CORE_URL", "https://core"),
                ("AGENT_ID", "a1"),
                ("AGENT_KEY", "k1"),
            ],
        );
        assert_eq!(
            after,
            "# comment\nCORE_URL=https://core\nAGENT_KEY=k1\n\n# AGENT_ID=commented\n\
             DNS_LISTEN=:53\nAGENT_ID=a1\n"
        );
    }

    #[test]
    fn odd_values_are_quoted_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("env");
        let text = update_env("", &[("AGENT_KEY", "a b\"c\\d#"), ("AGENT_ID", "plain-1")]);
        write_atomically(&path, text.as_bytes()).unwrap();
        let values = read_env_file(&path).unwrap().unwrap();
        assert_eq!(values["AGENT_KEY"], "a b\"c\\d#");
        assert_eq!(values["AGENT_ID"], "plain-1");
        assert_eq!(read_env_file(&dir.path().join("none")).unwrap(), None);
    }

    #[test]
    fn the_file_is_replaced_with_mode_0600_and_no_temporary_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("env");
        fs::write(&path, "X=1\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        write_atomically(&path, b"X=2\n").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "X=2\n");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("env")]);
        assert!(prepare_env_file(&dir.path().join("missing/env")).is_err());
    }
}

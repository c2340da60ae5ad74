//! `cargo xtask chromium`: installs Debian's headless Chromium for the browser tests and runs
//! it the way they do.
//!
//! - `install`: `apt-get install -y chromium` when `/usr/bin/chromium` is missing (as root);
//! - `dump URL [--budget MS]`: loads `URL`, runs its scripts and follows its navigations for
//!   at most `MS` milliseconds of virtual time, then prints the final DOM.
//!
//! The flags are the ones this machine needs (see /work/shared/deps.md): `--no-sandbox` because
//! CI runs as root, and every background-networking switch off because the network is closed
//! and Chromium would otherwise keep trying to reach Google's hosts. The integration test in
//! `crates/defenra-shield/tests/it/browser.rs` runs the same command line.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;

use crate::packages::is_executable;

/// Where Debian's `chromium` package puts the browser.
pub(crate) const CHROMIUM: &str = "/usr/bin/chromium";

/// The most a `dump` may take in real time before Chromium is killed.
const DUMP_DEADLINE: Duration = Duration::from_secs(60);

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    match args {
        [command] if command == "install" => {
            let path = ensure_installed()?;
            println!("{}", path.display());
            Ok(())
        }
        [command, url, rest @ ..] if command == "dump" => {
            let budget_ms = match rest {
                [] => 5_000,
                [flag, value] if flag == "--budget" => value
                    .parse()
                    .with_context(|| format!("--budget wants milliseconds, not {value:?}"))?,
                _ => anyhow::bail!("usage: cargo xtask chromium dump URL [--budget MS]"),
            };
            ensure_installed()?;
            print!("{}", dump_dom(url, budget_ms)?);
            Ok(())
        }
        _ => anyhow::bail!("usage: cargo xtask chromium <install | dump URL [--budget MS]>"),
    }
}

/// Returns the browser's path, installing Debian's `chromium` package first when it is
/// missing. Installing needs root (CI runs as root); anyone else gets the command to run.
///
/// # Errors
///
/// When Chromium is missing and cannot be installed.
pub(crate) fn ensure_installed() -> anyhow::Result<PathBuf> {
    let path = PathBuf::from(CHROMIUM);
    if is_executable(&path) {
        return Ok(path);
    }
    eprintln!("{CHROMIUM} is missing; installing Debian's chromium package (a minute or two)");
    crate::packages::ensure(&[(CHROMIUM, "chromium")])?;
    Ok(path)
}

/// Loads `url` in a fresh headless Chromium profile and returns the DOM it ends with.
///
/// # Errors
///
/// When Chromium cannot start, fails, or runs past the deadline.
pub(crate) fn dump_dom(url: &str, budget_ms: u64) -> anyhow::Result<String> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.subsec_nanos());
    let profile =
        std::env::temp_dir().join(format!("defenra-chromium-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&profile)
        .with_context(|| format!("cannot create {}", profile.display()))?;
    let result = run_chromium(&profile, url, budget_ms);
    // A profile is tens of megabytes; never leave one behind.
    let _ = std::fs::remove_dir_all(&profile);
    result
}

fn run_chromium(profile: &Path, url: &str, budget_ms: u64) -> anyhow::Result<String> {
    let mut child = Command::new(CHROMIUM)
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--virtual-time-budget={budget_ms}"))
        .arg("--dump-dom")
        .arg(url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {CHROMIUM}"))?;
    // Drain both pipes on threads so a large DOM cannot fill a pipe and stall Chromium.
    let stdout = child.stdout.take().map(drain);
    let stderr = child.stderr.take().map(drain);
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > DUMP_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("chromium did not finish {url} within {DUMP_DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = stdout.map(join).unwrap_or_default();
    let stderr = stderr.map(join).unwrap_or_default();
    anyhow::ensure!(
        status.success(),
        "chromium failed with {status}: {}",
        String::from_utf8_lossy(&stderr)
    );
    String::from_utf8(stdout).context("chromium printed a DOM that is not UTF-8")
}

fn drain(mut pipe: impl std::io::Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        bytes
    })
}

fn join(reader: std::thread::JoinHandle<Vec<u8>>) -> Vec<u8> {
    reader.join().unwrap_or_default()
}

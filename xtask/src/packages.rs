//! Debian packages the tests and benches need, installed when missing (CI runs as root on a
//! fresh machine with only the Rust toolchain, gcc and python3).

use std::path::Path;
use std::process::Command;

use anyhow::Context as _;

/// The programs the test suite runs: nftables (kernel bans in a network namespace),
/// iproute2 and util-linux (`ip`, `unshare`, `nsenter`), and Redis (the fleet's tests start
/// their own `redis-server`; `redis-cli` forms a Redis Cluster).
pub(crate) const TEST_PACKAGES: &[(&str, &str)] = &[
    ("/usr/bin/redis-server", "redis-server"),
    ("/usr/bin/redis-cli", "redis-tools"),
    ("/usr/sbin/nft", "nftables"),
    ("/usr/sbin/ip", "iproute2"),
    ("/usr/bin/unshare", "util-linux"),
    ("/usr/bin/nsenter", "util-linux"),
];

/// Installs the Debian package of every `(program, package)` whose program is missing, in
/// one `apt-get` run. Needs root when something is missing; others get the command.
///
/// # Errors
///
/// When a package is missing and cannot be installed.
pub(crate) fn ensure(wanted: &[(&str, &str)]) -> anyhow::Result<()> {
    let mut missing: Vec<&str> = wanted
        .iter()
        .filter(|(program, _)| !is_executable(Path::new(program)))
        .map(|(_, package)| *package)
        .collect();
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    anyhow::ensure!(
        is_root()?,
        "missing packages, and installing them needs root: run `sudo apt-get install -y {}`",
        missing.join(" ")
    );
    eprintln!("installing Debian packages: {}", missing.join(" "));
    apt_get(&["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(&missing);
    apt_get(&args)?;
    for (program, package) in wanted {
        anyhow::ensure!(
            is_executable(Path::new(program)),
            "apt-get installed {package} but {program} is still missing"
        );
    }
    Ok(())
}

pub(crate) fn apt_get(args: &[&str]) -> anyhow::Result<()> {
    eprintln!("$ apt-get {}", args.join(" "));
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("cannot start apt-get")?;
    anyhow::ensure!(
        status.success(),
        "`apt-get {}` failed with {status}",
        args.join(" ")
    );
    Ok(())
}

pub(crate) fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .is_ok_and(|metadata| metadata.is_file() && metadata.permissions().mode() & 0o111 != 0)
}

pub(crate) fn is_root() -> anyhow::Result<bool> {
    let output = Command::new("id")
        .arg("-u")
        .output()
        .context("cannot run `id -u`")?;
    Ok(String::from_utf8_lossy(&output.stdout).trim() == "0")
}

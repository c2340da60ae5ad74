//! `check-config`, `version` and usage errors.

use std::process::Command;

use crate::support::{binary, doc, write};

#[test]
fn check_config_prints_each_problem_with_its_path_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    write(&path, &doc("192.0.2.1"));
    let output = Command::new(binary())
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("domains[0].dnsRecords[1].value: \"1.2.3\" is not an IPv4 address"),
        "{stdout}"
    );
    assert!(
        stdout.contains("1 domains, 1 records, 0 proxies, 1 problem"),
        "{stdout}"
    );
}

#[test]
fn bad_anti_ddos_values_are_problems_with_their_paths() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    write(
        &path,
        r#"{"domains":[{"domain":"example.com","httpProxy":{"type":"both","antiDDoS":{
            "enabled":true,"rateLimit":{"windowSeconds":0,"maxRequests":"many"},
            "ipWhitelist":"203.0.113.7, 10.0.0.0/33"}},
            "dnsRecords":[{"name":"@","type":"A","value":"192.0.2.1"}]}]}"#,
    );
    let output = Command::new(binary())
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    for expected in [
        "domains[0].httpProxy.antiDDoS.rateLimit.windowSeconds: 0 is not a positive number",
        "domains[0].httpProxy.antiDDoS.rateLimit.maxRequests: not a number",
        "domains[0].httpProxy.antiDDoS.ipWhitelist: \"10.0.0.0/33\" is not an IP address",
    ] {
        assert!(
            stdout.contains(expected),
            "{expected:?} missing from: {stdout}"
        );
    }
}

#[test]
fn check_config_accepts_a_clean_file_and_the_demo() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    write(
        &path,
        r#"{"domains":[{"domain":"example.com","dnsRecords":[{"name":"@","type":"A","value":"192.0.2.1"}]}]}"#,
    );
    let output = Command::new(binary())
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    let demo = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/demo.json");
    let output = Command::new(binary())
        .args(["check-config", demo])
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "the demo config is clean: {}",
        String::from_utf8_lossy(&output.stdout)
    );
}

#[test]
fn check_config_rejects_non_json() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    write(&path, "domains: []");
    let output = Command::new(binary())
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("not valid JSON"));
}

#[test]
fn running_without_a_source_is_a_usage_error() {
    let output = Command::new(binary())
        .env_remove("CORE_URL")
        .env_remove("AGENT_ID")
        .env_remove("AGENT_KEY")
        .env_remove("DEFENRA_CONFIG")
        .args(["--core-url", "https://core.invalid"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--config")
            && stderr.contains("missing: --agent-id/AGENT_ID, --agent-key/AGENT_KEY"),
        "{stderr}"
    );
}

#[test]
fn env_vars_of_the_go_agent_are_read() {
    // POLLING_INTERVAL is validated like the flag: 0 is refused with the env var named.
    let output = Command::new(binary())
        .env("DEFENRA_CONFIG", "/nonexistent")
        .env("POLLING_INTERVAL", "0")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--poll-interval"));
}

#[test]
fn version_prints_the_package_version() {
    let output = Command::new(binary()).arg("version").output().unwrap();
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        format!("defenra-agent {}", env!("CARGO_PKG_VERSION"))
    );
}

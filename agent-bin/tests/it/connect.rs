//! `defenra-agent connect URL` and `CONNECT_URL` at start, against the fake Core.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use defenra_config::testing::{Answer, FakeCore};

use crate::support::{Agent, binary, eventually, get_json};

const ENV_BEFORE: &str = "# /etc/defenra-agent/env\nCORE_URL=https://old.example\nAGENT_ID=\n\
                          AGENT_KEY=\n# POLLING_INTERVAL=60\nDNS_LISTEN=0.0.0.0:53\n";

async fn run_connect(url: String, env_file: &Path) -> Output {
    let env_file = env_file.to_owned();
    tokio::task::spawn_blocking(move || {
        Command::new(binary())
            .args(["connect", &url, "--env-file"])
            .arg(&env_file)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_writes_the_credentials_once_and_leaves_the_file_alone_on_failure() {
    let core = FakeCore::start(Answer::Json(r#"{"success":true,"domains":[]}"#.into())).await;
    core.add_agent("agent-1", "key-1", "token-1");
    let dir = tempfile::tempdir().unwrap();
    let env_file = dir.path().join("env");
    std::fs::write(&env_file, ENV_BEFORE).unwrap();
    std::fs::set_permissions(&env_file, std::fs::Permissions::from_mode(0o640)).unwrap();

    let output = run_connect(core.connect_url("token-1"), &env_file).await;
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", text(&output.stderr));
    assert!(stdout.contains("agent agent-1"), "{stdout}");
    assert!(
        stdout.contains("Auto-assigned agent to europe across 0 domain(s)"),
        "Core's assignment message: {stdout}"
    );
    assert!(
        stdout.contains("systemctl restart defenra-agent"),
        "{stdout}"
    );
    let written = std::fs::read_to_string(&env_file).unwrap();
    let core_url = format!("http://{}", core.addr);
    assert_eq!(
        written,
        format!(
            "# /etc/defenra-agent/env\nCORE_URL={core_url}\nAGENT_ID=agent-1\nAGENT_KEY=key-1\n\
             # POLLING_INTERVAL=60\nDNS_LISTEN=0.0.0.0:53\nPOLLING_INTERVAL=60\n"
        )
    );
    assert_eq!(mode(&env_file), 0o600);
    assert_eq!(
        core.agent("agent-1").unwrap().ip_address,
        Some("127.0.0.1".parse().unwrap()),
        "Core records the caller's address"
    );

    // The token is spent: a second run fails with one line and leaves the file as it was.
    std::fs::set_permissions(&env_file, std::fs::Permissions::from_mode(0o640)).unwrap();
    let output = run_connect(core.connect_url("token-1"), &env_file).await;
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("404") && stderr.contains("already used"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&env_file).unwrap(), written);
    assert_eq!(mode(&env_file), 0o640, "untouched, mode included");

    // An agent Core already counts as connected: 409.
    core.add_agent("agent-2", "key-2", "token-2");
    core.update_agent("agent-2", |agent| agent.is_connected = true);
    let output = run_connect(core.connect_url("token-2"), &env_file).await;
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr.contains("409") && stderr.contains("already connected"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&env_file).unwrap(), written);

    // A URL without a token never reaches Core.
    let requests = core.received().len();
    let output = run_connect(
        format!("http://{}/api/agent/connect/", core.addr),
        &env_file,
    )
    .await;
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output.stderr).contains("no token"),
        "{}",
        text(&output.stderr)
    );
    assert_eq!(core.received().len(), requests);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_env_file_that_cannot_be_written_keeps_the_token_unspent() {
    let core = FakeCore::start(Answer::Json(r#"{"success":true,"domains":[]}"#.into())).await;
    core.add_agent("agent-3", "key-3", "token-3");
    let dir = tempfile::tempdir().unwrap();
    let env_file = dir.path().join("no-such-dir").join("env");
    let output = run_connect(core.connect_url("token-3"), &env_file).await;
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output.stderr).contains("cannot write"),
        "{}",
        text(&output.stderr)
    );
    assert!(core.received().is_empty(), "Core was not asked");
    assert_eq!(
        core.agent("agent-3").unwrap().connection_token.as_deref(),
        Some("token-3")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_url_at_start_enrols_once_then_polls_with_the_key() {
    let core = FakeCore::start(Answer::Json(
        r#"{"success":true,"domains":[{"domain":"example.com","dnsRecords":[{"name":"@","type":"A","value":"192.0.2.1"}]}]}"#.into(),
    ))
    .await;
    core.add_agent("agent-4", "key-4", "token-4");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let connect_url = core.connect_url("token-4");
    let args = [
        "--connect-url",
        connect_url.as_str(),
        "--state-dir",
        state.to_str().unwrap(),
        "--poll-interval",
        "1",
    ];
    {
        let agent = Agent::start(&args);
        let health = agent.addr("health");
        eventually("the enrolled agent polls Core", || {
            get_json(health, "/health").0 == 200
        });
    }
    let saved = state.join("agent.env");
    assert_eq!(mode(&saved), 0o600);
    assert!(
        std::fs::read_to_string(&saved)
            .unwrap()
            .contains("AGENT_KEY=key-4")
    );
    let polls: Vec<_> = core
        .received()
        .into_iter()
        .filter(|request| request.path == "/api/agent/poll")
        .collect();
    assert_eq!(polls[0].authorization.as_deref(), Some("Bearer key-4"));
    assert_eq!(polls[0].body["agentId"], "agent-4");

    // A restart does not spend the (spent) token again: the saved credentials are used.
    let connects_before = connects(&core);
    let agent = Agent::start(&args);
    let health = agent.addr("health");
    eventually("the restarted agent polls Core", || {
        get_json(health, "/health").0 == 200
    });
    assert_eq!(connects(&core), connects_before);
}

fn connects(core: &FakeCore) -> usize {
    core.received()
        .iter()
        .filter(|request| request.path.starts_with("/api/agent/connect/"))
        .count()
}

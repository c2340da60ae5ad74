//! Enrolment by connect URL against the fake Core, which answers as Core's connect route does.

use std::time::Duration;

use defenra_config::{ConnectError, ConnectUrl, enrol};

use crate::support::{Answer, FakeCore};

const TIMEOUT: Duration = Duration::from_secs(5);

fn document() -> String {
    r#"{"success":true,"domains":[
        {"id":"65f1c0ffee0000000000000a","domain":"a.test","geoDnsLocations":[{"code":"europe"},{"code":"us"}]},
        {"id":"65f1c0ffee0000000000000b","domain":"b.test","geoDnsLocations":[{"code":"asia"}]}]}"#
        .to_owned()
}

async fn connect(core: &FakeCore, token: &str) -> Result<defenra_config::Enrolment, ConnectError> {
    let url = ConnectUrl::parse(&core.connect_url(token))?;
    tokio::task::spawn_blocking(move || enrol::connect(&url, TIMEOUT))
        .await
        .unwrap()
}

fn status(result: Result<defenra_config::Enrolment, ConnectError>) -> (u16, String) {
    match result {
        Err(error @ ConnectError::Status { status, .. }) => (status, error.to_string()),
        other => panic!("expected a status error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_token_gives_credentials_once_and_then_404() {
    let core = FakeCore::start(Answer::Json(document())).await;
    core.add_agent("agent-7", "key-7", "tok-7");

    let enrolment = connect(&core, "tok-7").await.unwrap();
    assert_eq!(enrolment.core_url, format!("http://{}", core.addr));
    assert_eq!(
        (enrolment.agent_id.as_str(), enrolment.agent_key.as_str()),
        ("agent-7", "key-7")
    );
    assert_eq!(enrolment.polling_interval, Some(60));
    assert_eq!(enrolment.locations, vec!["europe".to_owned()]);
    assert_eq!(enrolment.assigned_count, 1);
    assert_eq!(
        enrolment.message.as_deref(),
        Some("Auto-assigned agent to europe across 2 domain(s)")
    );
    let agent = core.agent("agent-7").unwrap();
    assert!(agent.is_connected);
    assert_eq!(
        agent.connection_token, None,
        "Core clears the token on first use"
    );
    assert_eq!(agent.ip_address, Some("127.0.0.1".parse().unwrap()));

    let (code, reason) = status(connect(&core, "tok-7").await);
    assert_eq!(code, 404);
    assert!(reason.contains("already used"), "{reason}");
    assert_eq!(status(connect(&core, "never-issued").await).0, 404);
}

#[tokio::test]
async fn an_agent_already_connected_is_409() {
    let core = FakeCore::start(Answer::Json(document())).await;
    core.add_agent("agent-8", "key-8", "tok-8");
    core.update_agent("agent-8", |agent| agent.is_connected = true);
    let (code, reason) = status(connect(&core, "tok-8").await);
    assert_eq!(code, 409);
    assert!(reason.contains("already connected"), "{reason}");
}

#[tokio::test]
async fn core_failures_and_unreachable_cores_are_errors() {
    let core = FakeCore::start(Answer::Json(document())).await;
    core.add_agent("agent-9", "key-9", "tok-9");
    core.fail("/api/agent/connect/tok-9", Some(Answer::Status(502)));
    assert_eq!(status(connect(&core, "tok-9").await).0, 502);
    core.fail("/api/agent/connect/tok-9", Some(Answer::Garbage));
    assert!(matches!(
        connect(&core, "tok-9").await,
        Err(ConnectError::BadAnswer(_))
    ));
    assert!(!core.agent("agent-9").unwrap().is_connected);

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "http://{}/api/agent/connect/t",
        closed.local_addr().unwrap()
    );
    drop(closed);
    let url = ConnectUrl::parse(&url).unwrap();
    let result = tokio::task::spawn_blocking(move || enrol::connect(&url, TIMEOUT))
        .await
        .unwrap();
    assert!(
        matches!(result, Err(ConnectError::Transport { .. })),
        "{result:?}"
    );
}

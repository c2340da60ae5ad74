//! `CoreSource` against a fake Core: the request it sends, outages, recovery, the state dir.

use std::sync::Arc;
use std::time::Duration;

use defenra_config::{
    ConfigLoop, ConfigSource, CoreSource, CoreSourceOptions, IntervalPolicy, SnapshotCell,
    SourceError, StateDir,
};

use crate::support::{Answer, FakeCore, RecordingService, apex_ip, doc_with_ip};

fn core_source(core: &FakeCore) -> CoreSource {
    let mut options = CoreSourceOptions::new(core.url(), "agent-7", "s3cret");
    options.timeout = Duration::from_millis(500);
    CoreSource::new(options)
}

fn core_loop(core: &FakeCore, cell: &Arc<SnapshotCell>) -> ConfigLoop {
    ConfigLoop::new(
        Box::new(core_source(core)),
        Arc::clone(cell),
        IntervalPolicy::CoreDecides {
            default: Duration::from_secs(60),
        },
    )
}

#[tokio::test]
async fn poll_sends_the_bearer_key_and_agent_identity() {
    let core = FakeCore::start(Answer::Json(doc_with_ip("192.0.2.1"))).await;
    let doc = core_source(&core)
        .fetch()
        .await
        .unwrap()
        .expect("core always returns a document");
    assert!(std::str::from_utf8(&doc).unwrap().contains("192.0.2.1"));
    let received = core.received();
    assert_eq!(received.len(), 1);
    assert_eq!(
        received[0].path, "/api/agent/poll",
        "no double slash from the trailing / of the URL"
    );
    assert_eq!(received[0].authorization.as_deref(), Some("Bearer s3cret"));
    assert_eq!(
        received[0].content_type.as_deref(),
        Some("application/json")
    );
    assert_eq!(
        received[0].body,
        serde_json::json!({"agentId": "agent-7", "agentKey": "s3cret"})
    );
}

#[tokio::test]
async fn http_errors_report_status_and_an_excerpt() {
    let core = FakeCore::start(Answer::Status(503)).await;
    match core_source(&core).fetch().await {
        Err(SourceError::Status {
            status: 503,
            excerpt,
        }) => assert_eq!(excerpt, "internal trouble"),
        other => panic!("expected a status error, got {other:?}"),
    }
}

#[tokio::test]
async fn outages_keep_the_last_snapshot_and_polling_recovers() {
    let core = FakeCore::start(Answer::Json(doc_with_ip("192.0.2.1"))).await;
    let cell = Arc::new(SnapshotCell::new());
    let service = Arc::new(RecordingService::default());
    let mut config = core_loop(&core, &cell).with_service(service.clone());
    let stats = config.stats();
    assert!(config.start().await);
    let first = cell.load().unwrap();
    assert_eq!(apex_ip(&first), "192.0.2.1");
    assert_eq!(service.versions.lock().as_slice(), &[first.version]);
    // Issues a service reports show up next to the compiler's.
    assert_eq!(stats.issues()[0].path, "domains[0].luaCode");

    for (answer, what) in [
        (Answer::Status(500), "HTTP 500"),
        (Answer::Garbage, "not JSON"),
        (
            Answer::Json(r#"{"success":false,"message":"unknown agent"}"#.into()),
            "success false",
        ),
        (Answer::Hang, "timeout"),
    ] {
        core.set(answer);
        assert_eq!(
            config.poll_once().await,
            defenra_config::PollOutcome::Failed,
            "{what}"
        );
        assert_eq!(
            cell.load().unwrap().version,
            first.version,
            "{what} must not change the snapshot"
        );
        assert!(stats.last_error().is_some(), "{what} is reported");
    }
    assert_eq!(
        stats
            .polls_failed_total
            .load(std::sync::atomic::Ordering::Relaxed),
        4
    );

    // The same content again (new timestamp) is not republished.
    core.set(Answer::Json(doc_with_ip("192.0.2.1").replace(
        "\"timestamp\":\"192.0.2.1\"",
        "\"timestamp\":\"later\"",
    )));
    assert_eq!(
        config.poll_once().await,
        defenra_config::PollOutcome::Unchanged
    );
    assert_eq!(stats.last_error(), None, "a good poll clears the error");

    core.set(Answer::Json(doc_with_ip("192.0.2.2")));
    assert_eq!(
        config.poll_once().await,
        defenra_config::PollOutcome::Published
    );
    let second = cell.load().unwrap();
    assert_eq!(apex_ip(&second), "192.0.2.2");
    assert!(second.version > first.version);
    assert_eq!(service.versions.lock().len(), 2);
}

#[tokio::test]
async fn restart_during_an_outage_serves_the_saved_config() {
    let state_dir = tempfile::tempdir().unwrap();
    let core = FakeCore::start(Answer::Json(doc_with_ip("192.0.2.1"))).await;
    {
        let cell = Arc::new(SnapshotCell::new());
        let mut config = core_loop(&core, &cell).with_state_dir(StateDir::new(state_dir.path()));
        assert!(config.start().await);
    }
    // Core goes down; a new agent process starts.
    core.set(Answer::Status(500));
    let cell = Arc::new(SnapshotCell::new());
    let mut config = core_loop(&core, &cell).with_state_dir(StateDir::new(state_dir.path()));
    let stats = config.stats();
    assert!(config.start().await, "the saved config is served");
    assert_eq!(apex_ip(&cell.load().unwrap()), "192.0.2.1");
    assert_eq!(stats.origin(), "state");

    // Core comes back with news.
    core.set(Answer::Json(doc_with_ip("192.0.2.3")));
    config.poll_once().await;
    assert_eq!(apex_ip(&cell.load().unwrap()), "192.0.2.3");
    assert_eq!(stats.origin(), "core");
    let saved = std::fs::read_to_string(StateDir::new(state_dir.path()).last_good_path()).unwrap();
    assert!(saved.contains("192.0.2.3"), "the new document is saved");
}

#[tokio::test]
async fn a_corrupt_state_file_is_ignored_not_fatal() {
    let state_dir = tempfile::tempdir().unwrap();
    std::fs::write(
        StateDir::new(state_dir.path()).last_good_path(),
        b"{ truncated",
    )
    .unwrap();
    let core = FakeCore::start(Answer::Status(500)).await;
    let cell = Arc::new(SnapshotCell::new());
    let mut config = core_loop(&core, &cell).with_state_dir(StateDir::new(state_dir.path()));
    assert!(!config.start().await);
    assert!(cell.load().is_none());
    // Once Core answers, the agent recovers.
    core.set(Answer::Json(doc_with_ip("192.0.2.4")));
    config.poll_once().await;
    assert_eq!(apex_ip(&cell.load().unwrap()), "192.0.2.4");
}

#[tokio::test]
async fn core_next_poll_interval_is_used_unless_the_interval_is_fixed() {
    let core = FakeCore::start(Answer::Json(doc_with_ip("192.0.2.1").replacen(
        "{",
        r#"{"nextPollInterval":5,"#,
        1,
    )))
    .await;
    let cell = Arc::new(SnapshotCell::new());
    let mut config = core_loop(&core, &cell);
    config.start().await;
    assert_eq!(config.interval(), Duration::from_secs(5));
    let mut fixed = ConfigLoop::new(
        Box::new(core_source(&core)),
        Arc::clone(&cell),
        IntervalPolicy::Fixed(Duration::from_secs(30)),
    );
    fixed.start().await;
    assert_eq!(fixed.interval(), Duration::from_secs(30));
}

#[tokio::test]
async fn successes_change_after_each_successful_poll_only() {
    let core = FakeCore::start(Answer::Json(doc_with_ip("192.0.2.1"))).await;
    let cell = Arc::new(SnapshotCell::new());
    let mut config = core_loop(&core, &cell);
    let successes = config.successes();
    config.poll_once().await;
    assert_eq!(*successes.borrow(), 1);
    assert!(
        cell.load().is_some(),
        "announced once the snapshot is published"
    );
    config.poll_once().await;
    assert_eq!(
        *successes.borrow(),
        2,
        "an unchanged document is a success too"
    );
    core.set(Answer::Status(500));
    config.poll_once().await;
    core.set(Answer::Garbage);
    config.poll_once().await;
    assert_eq!(
        *successes.borrow(),
        2,
        "failures and rejected documents are not"
    );
}

#[tokio::test]
async fn reports_go_to_core_with_the_bearer_key_and_refusals_are_permanent() {
    use defenra_config::wire::{ClientReport, TrafficReport};
    use defenra_config::{CoreReporter, ReporterOptions};

    let document =
        r#"{"success":true,"domains":[{"id":"65f1c0ffee000000000000d1","domain":"a.test"}]}"#;
    let core = FakeCore::start(Answer::Json(document.to_owned())).await;
    core.add_agent("agent-7", "s3cret", "t");
    let reporter = |key: &str| {
        CoreReporter::new(ReporterOptions {
            url: core.url(),
            agent_key: key.to_owned(),
            timeout: Duration::from_secs(5),
        })
    };
    let (good, wrong_key) = (reporter("s3cret"), reporter("guess"));
    let report = |id: &str| TrafficReport {
        agent_id: "agent-7".into(),
        resource_type: "domain".into(),
        resource_id: id.into(),
        inbound_bytes: 10,
        outbound_bytes: 20,
        requests: 1,
        response_time_ms: 3,
        errors: 0,
    };
    let send = |reporter: CoreReporter, report: TrafficReport| {
        tokio::task::spawn_blocking(move || reporter.send_traffic(&report))
    };
    send(good, report("65f1c0ffee000000000000d1"))
        .await
        .unwrap()
        .unwrap();
    let rows = core.traffic();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (
            rows[0].requests,
            rows[0].inbound_bytes,
            rows[0].outbound_bytes
        ),
        (1, 10, 20)
    );

    // Not one of Core's ids, not an ObjectId at all, an unknown agent, a wrong key.
    let good = reporter("s3cret");
    let error = send(good, report("65f1c0ffee000000000000ff"))
        .await
        .unwrap()
        .unwrap_err();
    assert!(error.is_permanent(), "{error}");
    let good = reporter("s3cret");
    let error = send(good, report("p1")).await.unwrap().unwrap_err();
    assert!(!error.is_permanent(), "Core's cast error is a 500: {error}");
    let error = send(wrong_key, report("65f1c0ffee000000000000d1"))
        .await
        .unwrap()
        .unwrap_err();
    assert!(error.to_string().contains("401"), "{error}");
    assert_eq!(core.traffic().len(), 1);

    let client = reporter("s3cret");
    tokio::task::spawn_blocking(move || {
        client.send_client(&ClientReport {
            ip: "192.0.2.7".into(),
            agent_id: "agent-7".into(),
            user_agent: Some("curl/8".into()),
            country: Some("Germany".into()),
            city: None,
            country_code: Some("DE".into()),
        })
    })
    .await
    .unwrap()
    .unwrap();
    let clients = core.clients();
    assert_eq!(clients.len(), 1);
    assert_eq!(clients[0].country.as_deref(), Some("Germany"));
    assert_eq!(clients[0].city, None);
}

//! `FileSource`: changes are picked up, invalid edits keep the last good snapshot, SIGHUP
//! (the reload handle) forces a re-read.

use std::sync::Arc;
use std::time::Duration;

use defenra_config::{ConfigLoop, FileSource, IntervalPolicy, PollOutcome, SnapshotCell};
use tokio_util::sync::CancellationToken;

use crate::support::{apex_ip, doc_with_ip, eventually};

#[tokio::test]
async fn edits_are_applied_and_invalid_edits_keep_the_last_good_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.json");
    std::fs::write(&path, doc_with_ip("192.0.2.1")).unwrap();
    let cell = Arc::new(SnapshotCell::new());
    let mut config = ConfigLoop::new(
        Box::new(FileSource::new(&path)),
        Arc::clone(&cell),
        IntervalPolicy::Fixed(Duration::from_secs(1)),
    );
    assert!(config.start().await);
    assert_eq!(apex_ip(&cell.load().unwrap()), "192.0.2.1");
    assert_eq!(
        config.poll_once().await,
        PollOutcome::Unchanged,
        "an untouched file is not re-read"
    );

    std::fs::write(&path, "{ \"domains\": [ oops").unwrap();
    assert_eq!(config.poll_once().await, PollOutcome::Failed);
    assert_eq!(apex_ip(&cell.load().unwrap()), "192.0.2.1");

    std::fs::write(&path, doc_with_ip("192.0.2.22")).unwrap();
    assert_eq!(config.poll_once().await, PollOutcome::Published);
    assert_eq!(apex_ip(&cell.load().unwrap()), "192.0.2.22");

    std::fs::remove_file(&path).unwrap();
    assert_eq!(
        config.poll_once().await,
        PollOutcome::Failed,
        "a missing file is an error"
    );
    assert_eq!(apex_ip(&cell.load().unwrap()), "192.0.2.22");
}

#[tokio::test]
async fn reload_handle_rereads_the_file_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.json");
    std::fs::write(&path, doc_with_ip("192.0.2.1")).unwrap();
    let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
    let cell = Arc::new(SnapshotCell::new());
    // An hour between checks: only the reload handle can explain a quick update.
    let mut config = ConfigLoop::new(
        Box::new(FileSource::new(&path)),
        Arc::clone(&cell),
        IntervalPolicy::Fixed(Duration::from_secs(3600)),
    );
    assert!(config.start().await);
    let reload = config.reload_handle();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(config.run(shutdown.clone()));

    // Same length and same modification time: only a forced re-read can see this edit.
    std::fs::write(&path, doc_with_ip("192.0.2.9")).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(modified)
        .unwrap();
    reload.notify_one();
    eventually("the reload handle applies the edit", || {
        apex_ip(&cell.load().unwrap()) == "192.0.2.9"
    })
    .await;
    shutdown.cancel();
    task.await.unwrap();
}

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

#[tokio::test]
async fn files_that_are_not_regular_or_too_large_are_refused_with_a_clear_error() {
    // Issue 17 finding 12: `--config /dev/zero` grew to 3 GB, a FIFO froze the loop.
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo.json");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let big = dir.path().join("big.json");
    std::fs::write(&big, doc_with_ip("192.0.2.1")).unwrap();
    for (source, expected) in [
        (FileSource::new("/dev/zero"), "a device, not a regular file"),
        (FileSource::new(&fifo), "a FIFO, not a regular file"),
        (
            FileSource::new(dir.path()),
            "a directory, not a regular file",
        ),
        (
            FileSource::new(&big).with_max_bytes(64),
            "over the limit of 64",
        ),
    ] {
        let cell = Arc::new(SnapshotCell::new());
        let mut config = ConfigLoop::new(
            Box::new(source),
            cell,
            IntervalPolicy::Fixed(Duration::from_secs(1)),
        );
        let stats = config.stats();
        let polled = tokio::time::timeout(Duration::from_secs(5), config.poll_once())
            .await
            .expect("the fetch returns");
        assert_eq!(polled, PollOutcome::Failed, "{expected}");
        let error = stats.last_error().unwrap();
        assert!(error.contains(expected), "{error}");
    }
}

#[tokio::test]
async fn a_rejected_document_stays_reported_until_a_good_one_replaces_it() {
    // Issue 17 finding 12: the unchanged (still rejected) file cleared the error on the
    // next check, about a second later.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.json");
    std::fs::write(&path, doc_with_ip("192.0.2.1")).unwrap();
    let cell = Arc::new(SnapshotCell::new());
    let mut config = ConfigLoop::new(
        Box::new(FileSource::new(&path)),
        Arc::clone(&cell),
        IntervalPolicy::Fixed(Duration::from_secs(1)),
    );
    let stats = config.stats();
    assert!(config.start().await);
    std::fs::write(&path, "{ \"domains\": [ oops").unwrap();
    assert_eq!(config.poll_once().await, PollOutcome::Failed);
    let error = stats.last_error().expect("the rejection is reported");
    assert!(error.contains("not valid JSON"), "{error}");
    for _ in 0..3 {
        assert_eq!(config.poll_once().await, PollOutcome::Unchanged);
        assert_eq!(stats.last_error().as_deref(), Some(error.as_str()));
    }
    std::fs::write(&path, doc_with_ip("192.0.2.7")).unwrap();
    assert_eq!(config.poll_once().await, PollOutcome::Published);
    assert_eq!(stats.last_error(), None);
    assert_eq!(apex_ip(&cell.load().unwrap()), "192.0.2.7");
}

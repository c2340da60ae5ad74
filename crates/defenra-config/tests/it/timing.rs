//! The config loop's timing under paused time: interval, backoff, no busy loop.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use defenra_config::{ConfigLoop, ConfigSource, IntervalPolicy, SnapshotCell, SourceError};
use tokio_util::sync::CancellationToken;

/// A source that fails or succeeds on demand and counts fetches.
struct FlakySource {
    fetches: Arc<AtomicUsize>,
    failing: Arc<std::sync::atomic::AtomicBool>,
}

#[async_trait]
impl ConfigSource for FlakySource {
    fn kind(&self) -> &'static str {
        "test"
    }

    async fn fetch(&self) -> Result<Option<Bytes>, SourceError> {
        self.fetches.fetch_add(1, Relaxed);
        if self.failing.load(Relaxed) {
            Err(SourceError::Status {
                status: 500,
                excerpt: String::new(),
            })
        } else {
            Ok(Some(Bytes::from_static(br#"{"domains":[]}"#)))
        }
    }
}

#[tokio::test(start_paused = true)]
async fn failures_back_off_exponentially_and_success_restores_the_interval() {
    let fetches = Arc::new(AtomicUsize::new(0));
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let source = FlakySource {
        fetches: Arc::clone(&fetches),
        failing: Arc::clone(&failing),
    };
    let cell = Arc::new(SnapshotCell::new());
    let mut config = ConfigLoop::new(
        Box::new(source),
        cell,
        IntervalPolicy::Fixed(Duration::from_secs(60)),
    );
    assert!(!config.start().await);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(config.run(shutdown.clone()));

    // Backoff 1, 2, 4, 8, 16, 32 s (±25 %), then capped at 60 s: about 6 retries in two
    // minutes, never a busy loop.
    tokio::time::sleep(Duration::from_secs(120)).await;
    let retries = fetches.load(Relaxed) - 1;
    assert!((5..=9).contains(&retries), "{retries} retries in 120 s");

    // Once Core is back, one fetch per interval.
    failing.store(false, Relaxed);
    tokio::time::sleep(Duration::from_secs(61)).await;
    let before = fetches.load(Relaxed);
    tokio::time::sleep(Duration::from_secs(600)).await;
    let per_interval = fetches.load(Relaxed) - before;
    assert!(
        (9..=11).contains(&per_interval),
        "{per_interval} fetches in 600 s at a 60 s interval"
    );
    shutdown.cancel();
    task.await.unwrap();
}

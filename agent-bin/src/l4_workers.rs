//! The threads TCP forwards accept on: one current-thread runtime per core (`l4-0`, `l4-1`, ...).

use std::time::Duration;

use anyhow::Context;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// Worker runtimes for [`defenra_l4::L4Service::with_workers`]. Each thread runs its runtime
/// until [`stop`](L4Workers::stop) (or drop), which must come after the service's `serve`
/// has returned: the connections live on these runtimes.
pub(crate) struct L4Workers {
    handles: Vec<Handle>,
    stop: CancellationToken,
}

impl L4Workers {
    /// Starts `count` threads (at least one), each with its own runtime.
    ///
    /// # Errors
    ///
    /// When a runtime or a thread cannot be created.
    pub(crate) fn start(count: usize) -> anyhow::Result<L4Workers> {
        let stop = CancellationToken::new();
        let mut handles = Vec::new();
        for index in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot build an L4 worker runtime")?;
            handles.push(runtime.handle().clone());
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("l4-{index}"))
                .spawn(move || {
                    runtime.block_on(stop.cancelled());
                    // A host name lookup stuck on the blocking pool must not hold the exit.
                    runtime.shutdown_timeout(Duration::from_secs(1));
                })
                .context("cannot start an L4 worker thread")?;
        }
        Ok(L4Workers { handles, stop })
    }

    pub(crate) fn handles(&self) -> Vec<Handle> {
        self.handles.clone()
    }

    /// Ends every worker runtime; their threads exit on their own.
    pub(crate) fn stop(self) {
        self.stop.cancel();
    }
}

impl Drop for L4Workers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

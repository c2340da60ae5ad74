//! Memory: a reload hook that hands memory freed by a config change back to the operating
//! system.

use std::sync::Arc;

use defenra_config::{Issue, Reload, Snapshot};

/// Registered last with the config loop. Compiling a large document and building the
/// services' indexes frees tens of MiB that glibc malloc would otherwise keep in its arenas.
pub(crate) struct ReturnFreedMemory;

impl Reload for ReturnFreedMemory {
    fn reload(&self, _snapshot: &Arc<Snapshot>, _issues: &mut Vec<Issue>) {
        // SAFETY: `malloc_trim` takes no pointers; it only releases free memory at the
        // top of glibc's heaps and of its arenas, and is thread-safe.
        #[allow(unsafe_code)]
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

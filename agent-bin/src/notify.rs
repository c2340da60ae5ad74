//! systemd readiness notification (`Type=notify`) without linking libsystemd: one datagram
//! to `$NOTIFY_SOCKET`, as sd_notify(3) describes.

use std::os::unix::net::{SocketAddr, UnixDatagram};

use tracing::{debug, warn};

/// Sends `state` (e.g. `READY=1`) to the service manager, if one is listening. Does
/// nothing when `NOTIFY_SOCKET` is unset (not started by systemd, or not `Type=notify`).
pub(crate) fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let result = (|| -> std::io::Result<()> {
        let address = if let Some(name) = path.strip_prefix('@') {
            // A leading '@' names a Linux abstract socket.
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name.as_bytes())?
        } else {
            SocketAddr::from_pathname(&path)?
        };
        let socket = UnixDatagram::unbound()?;
        socket.send_to_addr(state.as_bytes(), &address)?;
        Ok(())
    })();
    match result {
        Ok(()) => debug!(state, "notified the service manager"),
        Err(error) => warn!(%error, socket = %path, "cannot notify the service manager"),
    }
}

//! Zero-copy forwarding of one direction with Linux `splice(2)`: socket → pipe → socket.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use nix::fcntl::{OFlag, SpliceFFlags, splice};
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::relay::Activity;

/// Most bytes moved per `splice` call: the default pipe capacity (16 pages), so one call
/// never finds the pipe full.
const CHUNK: usize = 64 * 1024;

/// A non-blocking pipe, the kernel-side buffer of one direction. Closed on drop.
pub(crate) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    pub(crate) fn new() -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        Ok(Pipe { read, write })
    }
}

/// `from` → `to` until EOF, then shuts down `to`'s write side. The pipe is always empty
/// when a read starts, so `EAGAIN` from the socket → pipe step can only mean the socket
/// has nothing, and from the pipe → socket step only that the socket is full.
pub(crate) async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    pipe: Pipe,
    counter: &AtomicU64,
    activity: &Activity,
) -> io::Result<()> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        from.readable().await?;
        let moved = from.try_io(Interest::READABLE, || {
            splice(from.as_fd(), None, pipe.write.as_fd(), None, CHUNK, flags)
                .map_err(io::Error::from)
        });
        let n = match moved {
            Ok(0) => return activity.end_direction(to),
            Ok(n) => n,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            Err(error) => return Err(error),
        };
        let mut left = n;
        while left > 0 {
            to.writable().await?;
            let written = to.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_fd(), None, to.as_fd(), None, left, flags)
                    .map_err(io::Error::from)
            });
            match written {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => left -= written,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                Err(error) => return Err(error),
            }
        }
        counter.fetch_add(n as u64, Relaxed);
        activity.touch();
    }
}

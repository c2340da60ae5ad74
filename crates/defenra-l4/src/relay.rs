//! Bidirectional byte copy between client and destination, with half-close and idle timeout.
//!
//! Each direction copies through a userspace buffer that exists only while bytes are queued.
//! With `splice` on (Linux), a direction whose read fills that buffer (a bulk transfer) switches
//! to `splice(2)` through a pipe: less CPU for the proxy, but on loopback more for the endpoints,
//! which is why it is off by default (docs/l4.md).

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::time::Instant;

/// How a relay ended without an I/O error.
#[derive(Debug)]
pub(crate) enum RelayEnd {
    /// Both directions reached EOF and were shut down.
    Closed,
    /// No byte moved in either direction for the idle timeout.
    Idle,
}

/// How the bytes of one direction are copied.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CopyMode {
    /// Userspace buffer size, per direction.
    pub(crate) buffer_size: usize,
    /// Switch to `splice(2)` once a read fills the buffer (Linux only; ignored elsewhere).
    pub(crate) splice: bool,
}

/// Copies both ways until both directions have seen EOF, one fails, or nothing moves for
/// `idle_timeout`. On EOF from one side the other side's write half is shut down and the
/// opposite direction keeps flowing (TCP half-close).
pub(crate) async fn relay(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    mode: CopyMode,
    idle_timeout: Duration,
    from_client: &AtomicU64,
    to_client: &AtomicU64,
) -> io::Result<RelayEnd> {
    let activity = Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
        one_direction_ended: AtomicBool::new(false),
    };
    let (client_read, client_write) = client.split();
    let (upstream_read, upstream_write) = upstream.split();
    let upstream_bound = pump(client_read, upstream_write, mode, from_client, &activity);
    let client_bound = pump(upstream_read, client_write, mode, to_client, &activity);
    tokio::pin!(upstream_bound, client_bound);
    let mut upstream_done = false;
    let mut client_done = false;
    let idle = tokio::time::sleep(idle_timeout);
    tokio::pin!(idle);
    while !(upstream_done && client_done) {
        tokio::select! {
            result = &mut upstream_bound, if !upstream_done => {
                result?;
                upstream_done = true;
            }
            result = &mut client_bound, if !client_done => {
                result?;
                client_done = true;
            }
            () = &mut idle => {
                // Re-armed from the last activity instead of reset on every read: the timer
                // fires at most once per idle period.
                let deadline = activity.last() + idle_timeout;
                if deadline <= Instant::now() {
                    return Ok(RelayEnd::Idle);
                }
                idle.as_mut().reset(deadline);
            }
        }
    }
    Ok(RelayEnd::Closed)
}

/// When a byte last moved, and whether one direction has ended. Both directions run in
/// one task; the atomics are only there because the future must be `Send`.
pub(crate) struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    one_direction_ended: AtomicBool,
}

impl Activity {
    /// Called by a direction that read EOF: shuts down `to`'s write side, unless the other
    /// direction has ended already. Then both sockets have been read to EOF and are closed
    /// as soon as the relay returns, and `close` sends the FIN: one system call less per
    /// connection.
    pub(crate) fn end_direction(&self, to: &TcpStream) -> io::Result<()> {
        if self.one_direction_ended.swap(true, Relaxed) {
            Ok(())
        } else {
            shutdown_write(to)
        }
    }

    pub(crate) fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Relaxed))
    }
}

/// One direction: `from` → `to` until EOF, then shut down `to`'s write side.
///
/// Reads and writes go through tokio's `AsyncRead`/`AsyncWrite`, which treat a short read or
/// write as "drained" under edge-triggered epoll and skip the `EAGAIN` system call that
/// `try_read` would need before waiting again.
async fn pump(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    mode: CopyMode,
    counter: &AtomicU64,
    activity: &Activity,
) -> io::Result<()> {
    // Allocated when bytes are ready, and never zeroed: `read_buf` fills the spare capacity.
    // Short connections thus cost no memset.
    let capacity = mode.buffer_size.max(1024);
    let mut buffer: Vec<u8> = Vec::new();
    loop {
        if buffer.capacity() == 0 {
            from.as_ref().readable().await?;
            buffer.reserve_exact(capacity);
        }
        let n = from.read_buf(&mut buffer).await?;
        if n == 0 {
            return activity.end_direction(to.as_ref());
        }
        to.write_all(&buffer).await?;
        buffer.clear();
        counter.fetch_add(n as u64, Relaxed);
        activity.touch();
        if n < capacity {
            // A short read drained the socket: give the buffer back until more arrives (as
            // HAProxy releases empty buffers), so an idle connection holds none. Bulk
            // transfers fill every read and keep theirs.
            buffer = Vec::new();
            continue;
        }
        #[cfg(target_os = "linux")]
        if mode.splice {
            // A full buffer means bulk data: move the rest through the kernel. If no pipe
            // can be had (out of file descriptors), keep copying here.
            match crate::splice::Pipe::new() {
                Ok(pipe) => {
                    drop(buffer);
                    let (from, to) = (from.as_ref(), to.as_ref());
                    return crate::splice::pump(from, to, pipe, counter, activity).await;
                }
                Err(error) => {
                    tracing::debug!(%error, "no pipe for splice; copying in userspace");
                }
            }
        }
    }
}

/// Sends FIN to `stream`'s peer; reading from it stays possible.
fn shutdown_write(stream: &TcpStream) -> io::Result<()> {
    match socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Write) {
        // The peer already closed both ways; nothing left to tell it.
        Err(error) if error.kind() == io::ErrorKind::NotConnected => Ok(()),
        result => result,
    }
}

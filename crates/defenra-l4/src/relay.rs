//! Bidirectional byte copy between client and destination, with half-close and idle timeout.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// How a relay ended when it did not end with both sides closing cleanly.
#[derive(Debug)]
pub(crate) enum RelayEnd {
    /// Both directions reached EOF and were shut down.
    Closed,
    /// No byte moved in either direction for the idle timeout.
    Idle,
}

/// Copies both ways until both directions have seen EOF, one fails, or nothing moves for
/// `idle_timeout`. On EOF from one side the other side's write half is shut down and the
/// opposite direction keeps flowing (TCP half-close).
///
/// Userspace copy with one `buffer_size` buffer per direction; see docs/l4.md for why this
/// is not `splice`.
pub(crate) async fn relay(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    buffer_size: usize,
    idle_timeout: Duration,
    from_client: &AtomicU64,
    to_client: &AtomicU64,
) -> io::Result<RelayEnd> {
    let start = Instant::now();
    // Milliseconds since `start` of the last byte moved. Both directions run in this task,
    // an atomic only because the future must be `Send`.
    let last_activity = AtomicU64::new(0);
    let (mut client_read, mut client_write) = client.split();
    let (mut upstream_read, mut upstream_write) = upstream.split();
    let upstream_bound = copy_until_eof(
        &mut client_read,
        &mut upstream_write,
        buffer_size,
        from_client,
        &last_activity,
        start,
    );
    let client_bound = copy_until_eof(
        &mut upstream_read,
        &mut client_write,
        buffer_size,
        to_client,
        &last_activity,
        start,
    );
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
                // Re-arm from the last activity instead of resetting the timer on every
                // read: the timer fires at most once per idle period.
                let last = start + Duration::from_millis(last_activity.load(Relaxed));
                let deadline = last + idle_timeout;
                if deadline <= Instant::now() {
                    return Ok(RelayEnd::Idle);
                }
                idle.as_mut().reset(deadline);
            }
        }
    }
    Ok(RelayEnd::Closed)
}

async fn copy_until_eof<R, W>(
    reader: &mut R,
    writer: &mut W,
    buffer_size: usize,
    counter: &AtomicU64,
    last_activity: &AtomicU64,
    start: Instant,
) -> io::Result<()>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut buffer = vec![0u8; buffer_size.max(1024)];
    loop {
        let n = reader.read(&mut buffer).await?;
        if n == 0 {
            // EOF from this side: pass the FIN on and leave the other direction open.
            writer.shutdown().await?;
            return Ok(());
        }
        writer.write_all(&buffer[..n]).await?;
        counter.fetch_add(n as u64, Relaxed);
        last_activity.store(start.elapsed().as_millis() as u64, Relaxed);
    }
}

//! Entry points for the fuzz targets in `fuzz/`. Not a stable API: hidden from the docs,
//! and free to change with the code they wrap. Nothing here changes how the service
//! behaves; each function runs the real code path on bytes a fuzzer chose.
//!
//! UDP needs nothing extra ([`DnsService::answer`] is the whole answer path);
//! [`answer_tcp_stream`] runs the real DNS-over-TCP connection loop (length-prefixed
//! framing, pipelining, the query budget) over scripted reads instead of a socket.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::DnsService;

/// Runs one DNS-over-TCP connection from `peer` whose reads return `reads` in order (each
/// read at most one element, cut to the reader's buffer), then end of stream. Returns every
/// byte the service wrote back. Needs a tokio runtime with the time driver enabled; it
/// never waits on a timer, because the scripted stream never blocks.
pub async fn answer_tcp_stream(
    service: &DnsService,
    peer: SocketAddr,
    reads: Vec<Vec<u8>>,
) -> Vec<u8> {
    let mut stream = ScriptedStream {
        reads: reads.into(),
        written: Vec::new(),
    };
    service.serve_stream(&mut stream, peer).await;
    stream.written
}

/// A byte stream whose reads are scripted and whose writes are kept.
struct ScriptedStream {
    reads: VecDeque<Vec<u8>>,
    written: Vec<u8>,
}

impl AsyncRead for ScriptedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let room = buf.remaining();
        if let Some(next) = self.reads.front_mut() {
            let taken = next.len().min(room);
            buf.put_slice(&next[..taken]);
            if taken == next.len() {
                self.reads.pop_front();
            } else {
                next.drain(..taken);
            }
        }
        // Nothing put in the buffer is the end of the stream.
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ScriptedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.written.extend_from_slice(bytes);
        Poll::Ready(Ok(bytes.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

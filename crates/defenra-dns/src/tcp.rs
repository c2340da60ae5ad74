//! DNS over TCP: who gets a connection (a global and a per-address cap, with the oldest
//! idle connection making room when the table is full) and the per-connection loop (one
//! deadline per message, answers sent as soon as they are ready, a query budget).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::DnsService;
use crate::answer::Transport;
use crate::server::canonical;
use crate::stats::DnsStats;

/// Bytes asked of the kernel per read.
const READ_CHUNK: usize = 4096;
/// Answers to pipelined queries are written together, but never more than this many bytes
/// at once, so a burst of small queries for large answers cannot pile up memory.
const FLUSH_AT: usize = 16 * 1024;

/// The open TCP connections. Touched on accept, on close and when a connection is picked
/// for eviction: never per query, and never across an `.await` (a std mutex is enough).
pub(crate) struct ConnTable {
    max_total: usize,
    max_per_ip: usize,
    /// Zero point of [`ConnSlot::idle_since`].
    epoch: Instant,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    open: HashMap<u64, Arc<ConnSlot>>,
    per_ip: HashMap<IpAddr, usize>,
}

/// One admitted connection, shared between the table and the connection's task.
pub(crate) struct ConnSlot {
    id: u64,
    ip: IpAddr,
    /// Milliseconds since the table's epoch, plus one, since the connection began waiting
    /// for a new message with nothing buffered either way; 0 while it is busy.
    idle_since: AtomicU64,
    /// Cancelled when the table evicts this connection to make room.
    evicted: CancellationToken,
}

/// The answer to a new connection.
pub(crate) enum Admission {
    Admitted {
        guard: ConnGuard,
        /// An idle connection was closed to make room.
        evicted: bool,
    },
    /// The peer's address already holds its share of connections.
    RefusedPerAddress,
    /// The table is full and no connection is idle.
    RefusedFull,
}

/// Removes its connection from the table when dropped.
pub(crate) struct ConnGuard {
    table: Arc<ConnTable>,
    slot: Arc<ConnSlot>,
}

impl ConnTable {
    pub(crate) fn new(max_total: usize, max_per_ip: usize) -> ConnTable {
        ConnTable {
            max_total: max_total.max(1),
            max_per_ip: max_per_ip.max(1),
            epoch: Instant::now(),
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Admits a connection from `ip`, or says why not. When the table is full, the
    /// connection idle the longest is evicted to make room; one that is in the middle of
    /// a message or of sending answers is never evicted.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr, stats: &DnsStats) -> Admission {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if inner.per_ip.get(&ip).copied().unwrap_or(0) >= self.max_per_ip {
            return Admission::RefusedPerAddress;
        }
        let mut evicted = false;
        if inner.open.len() >= self.max_total {
            let oldest = inner
                .open
                .values()
                .filter_map(|slot| {
                    let since = slot.idle_since.load(Relaxed);
                    (since != 0).then_some((since, slot.id))
                })
                .min();
            let Some((_, id)) = oldest else {
                return Admission::RefusedFull;
            };
            if let Some(slot) = inner.remove(id) {
                slot.evicted.cancel();
                evicted = true;
            }
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let slot = Arc::new(ConnSlot {
            id,
            ip,
            idle_since: AtomicU64::new(0),
            evicted: CancellationToken::new(),
        });
        inner.open.insert(id, Arc::clone(&slot));
        *inner.per_ip.entry(ip).or_insert(0) += 1;
        drop(inner);
        // A new connection is idle until its first bytes arrive.
        slot.mark_idle(self.epoch, stats);
        Admission::Admitted {
            guard: ConnGuard {
                table: Arc::clone(self),
                slot,
            },
            evicted,
        }
    }
}

impl Inner {
    fn remove(&mut self, id: u64) -> Option<Arc<ConnSlot>> {
        let slot = self.open.remove(&id)?;
        if let Some(count) = self.per_ip.get_mut(&slot.ip) {
            *count -= 1;
            if *count == 0 {
                self.per_ip.remove(&slot.ip);
            }
        }
        Some(slot)
    }
}

impl ConnSlot {
    fn mark_idle(&self, epoch: Instant, stats: &DnsStats) {
        let now = epoch.elapsed().as_millis() as u64 + 1;
        if self.idle_since.swap(now, Relaxed) == 0 {
            stats.tcp_idle_changed(true);
        }
    }

    fn mark_busy(&self, stats: &DnsStats) {
        if self.idle_since.swap(0, Relaxed) != 0 {
            stats.tcp_idle_changed(false);
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        // An evicted slot has left the table already.
        self.table
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(self.slot.id);
    }
}

/// Why a connection ended.
#[derive(Debug)]
enum Ending {
    /// The client closed, or sent a zero-length message.
    Closed,
    Shutdown,
    Evicted,
    /// A message, or the writing of answers, missed its deadline.
    Deadline,
    /// The connection answered `--dns-tcp-max-queries` messages.
    QueryBudget,
}

impl DnsService {
    /// One TCP connection: length-prefixed messages (RFC 1035 §4.2.2) answered in order.
    /// Pipelined queries are read without waiting for earlier answers (RFC 7766 §6.2.1.1),
    /// and every answer ready is sent before waiting for more input, even when the buffer
    /// holds part of the next query. Each message must arrive whole within
    /// `tcp_idle_timeout` of the moment the connection began waiting for it, however the
    /// client spreads its bytes.
    pub(crate) async fn tcp_connection(
        self: Arc<Self>,
        mut stream: TcpStream,
        peer: SocketAddr,
        shutdown: CancellationToken,
        guard: ConnGuard,
    ) {
        self.stats.tcp_opened();
        let _ = stream.set_nodelay(true);
        let ending = self.serve_tcp(&mut stream, peer, &shutdown, &guard).await;
        match ending {
            Ok(Ending::Deadline) => self.stats.count_tcp_timeout(),
            Ok(Ending::QueryBudget) => self.stats.count_tcp_query_budget(),
            Ok(Ending::Evicted) => debug!(%peer, "dns tcp connection evicted while idle"),
            Ok(Ending::Closed | Ending::Shutdown) => {}
            Err(error) => debug!(%peer, %error, "dns tcp connection ended"),
        }
        let _ = stream.shutdown().await;
        guard.slot.mark_busy(&self.stats);
        self.stats.tcp_closed();
    }

    /// [`DnsService::serve_tcp`] over any byte stream, as one connection from `peer` in a
    /// table of its own; for the fuzz targets (`fuzzing::answer_tcp_stream`).
    pub(crate) async fn serve_stream<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        peer: SocketAddr,
    ) {
        let table = Arc::new(ConnTable::new(1, 1));
        let stats = DnsStats::default();
        if let Admission::Admitted { guard, .. } = table.admit(canonical(peer.ip()), &stats) {
            let shutdown = CancellationToken::new();
            let _ = self.serve_tcp(stream, peer, &shutdown, &guard).await;
        }
    }

    /// The connection loop, over a `TcpStream` in the agent and over scripted reads in the
    /// fuzz targets.
    async fn serve_tcp<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        peer: SocketAddr,
        shutdown: &CancellationToken,
        guard: &ConnGuard,
    ) -> std::io::Result<Ending> {
        let idle = self.options.tcp_idle_timeout;
        let max_queries = self.options.tcp_max_queries.max(1);
        let source = canonical(peer.ip());
        let slot = &guard.slot;
        let epoch = guard.table.epoch;
        // Both grow to the largest message seen, so idle connections stay small.
        let mut input: Vec<u8> = Vec::with_capacity(512);
        let mut output: Vec<u8> = Vec::new();
        let mut response = Vec::with_capacity(512);
        let mut n_messages = 0usize;
        let mut deadline = tokio::time::Instant::now() + idle;
        loop {
            let mut at = 0;
            let mut completed = false;
            while let [hi, lo, ..] = input[at..] {
                let len = usize::from(u16::from_be_bytes([hi, lo]));
                if len == 0 {
                    write_by(stream, &output, idle).await?;
                    return Ok(Ending::Closed);
                }
                let Some(packet) = input.get(at + 2..at + 2 + len) else {
                    break;
                };
                if self.answer_with(packet, source, Transport::Tcp, 0, &mut response) {
                    output.extend_from_slice(&(response.len() as u16).to_be_bytes());
                    output.extend_from_slice(&response);
                }
                at += 2 + len;
                completed = true;
                n_messages += 1;
                if n_messages >= max_queries {
                    write_by(stream, &output, idle).await?;
                    return Ok(Ending::QueryBudget);
                }
                if output.len() >= FLUSH_AT {
                    if !write_by(stream, &output, idle).await? {
                        return Ok(Ending::Deadline);
                    }
                    output.clear();
                }
            }
            input.drain(..at);
            // RFC 7766 §6.2.1.1: send what is ready now, whatever is left in `input`.
            if !output.is_empty() {
                if !write_by(stream, &output, idle).await? {
                    return Ok(Ending::Deadline);
                }
                output.clear();
            }
            if completed {
                // The next message's deadline counts from here, not from each read.
                deadline = tokio::time::Instant::now() + idle;
            }
            if input.is_empty() {
                slot.mark_idle(epoch, &self.stats);
            }
            input.reserve(READ_CHUNK);
            let read = tokio::select! {
                biased;
                () = shutdown.cancelled() => return Ok(Ending::Shutdown),
                () = slot.evicted.cancelled() => return Ok(Ending::Evicted),
                read = tokio::time::timeout_at(deadline, stream.read_buf(&mut input)) => read,
            };
            slot.mark_busy(&self.stats);
            match read {
                Err(_) => return Ok(Ending::Deadline),
                Ok(Ok(0)) => return Ok(Ending::Closed),
                Ok(Ok(_)) => {}
                Ok(Err(error)) => return Err(error),
            }
        }
    }
}

/// Writes `bytes` whole within `limit`; `Ok(false)` when the client did not take them in
/// time (a client that does not read must not hold the connection).
async fn write_by<S: AsyncWrite + Unpin>(
    stream: &mut S,
    bytes: &[u8],
    limit: std::time::Duration,
) -> std::io::Result<bool> {
    if bytes.is_empty() {
        return Ok(true);
    }
    match tokio::time::timeout(limit, stream.write_all(bytes)).await {
        Ok(written) => written.map(|()| true),
        Err(_) => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn the_per_address_cap_counts_open_connections_only() {
        let table = Arc::new(ConnTable::new(100, 2));
        let stats = DnsStats::default();
        let first = table.admit(ip("192.0.2.1"), &stats);
        let second = table.admit(ip("192.0.2.1"), &stats);
        assert!(matches!(
            table.admit(ip("192.0.2.1"), &stats),
            Admission::RefusedPerAddress
        ));
        assert!(matches!(
            table.admit(ip("192.0.2.2"), &stats),
            Admission::Admitted { .. }
        ));
        drop(first);
        assert!(matches!(
            table.admit(ip("192.0.2.1"), &stats),
            Admission::Admitted { .. }
        ));
        drop(second);
    }

    #[test]
    fn a_full_table_evicts_the_connection_idle_longest_and_never_a_busy_one() {
        let table = Arc::new(ConnTable::new(2, 10));
        let stats = DnsStats::default();
        let Admission::Admitted { guard: old, .. } = table.admit(ip("192.0.2.1"), &stats) else {
            panic!("admitted");
        };
        std::thread::sleep(std::time::Duration::from_millis(5));
        let Admission::Admitted { guard: young, .. } = table.admit(ip("192.0.2.2"), &stats) else {
            panic!("admitted");
        };
        let Admission::Admitted {
            guard: _third,
            evicted,
        } = table.admit(ip("192.0.2.3"), &stats)
        else {
            panic!("admitted");
        };
        assert!(evicted);
        assert!(old.slot.evicted.is_cancelled());
        assert!(!young.slot.evicted.is_cancelled());
        // Dropping the evicted guard later changes nothing.
        drop(old);
        young.slot.mark_busy(&stats);
        // Full again (young + the third); the third is idle, young is busy.
        let Admission::Admitted { evicted, .. } = table.admit(ip("192.0.2.4"), &stats) else {
            panic!("admitted");
        };
        assert!(evicted);
        assert!(!young.slot.evicted.is_cancelled());
    }
}

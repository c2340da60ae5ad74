//! The Linux UDP loop: several queries per `recvmmsg(2)` and their answers in one
//! `sendmmsg(2)`, through nix's safe wrappers, on buffers allocated once per socket.

use std::io::{IoSlice, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::DnsService;
use crate::answer::Transport;

/// Most datagrams per system call ([`DnsOptions::udp_batch`](crate::DnsOptions) is capped to it).
pub(crate) const MAX_BATCH: usize = 64;
/// Receive buffer per datagram. A longer datagram is cut (MSG_TRUNC) and dropped; queries
/// are a few hundred bytes.
const QUERY_BUFFER: usize = 4096;

impl DnsService {
    /// Receives whatever is queued (waiting for at least one datagram), answers each into
    /// its own buffer, and sends the answers together.
    pub(crate) fn udp_loop_batched(&self, socket: &UdpSocket, shutdown: &CancellationToken) {
        let fd = socket.as_raw_fd();
        let batch = self.options.udp_batch.clamp(1, MAX_BATCH);
        let mut queries: Vec<Vec<u8>> = (0..batch).map(|_| vec![0u8; QUERY_BUFFER]).collect();
        let mut answers: Vec<Vec<u8>> = (0..batch).map(|_| Vec::with_capacity(1232)).collect();
        let mut receive_headers = MultiHeaders::<SockaddrStorage>::preallocate(batch, None);
        let mut send_headers = MultiHeaders::<SockaddrStorage>::preallocate(batch, None);
        // Per datagram: length, sender, whether it was cut.
        let mut received: Vec<(usize, Option<SockaddrStorage>, bool)> = Vec::with_capacity(batch);
        let mut to_send: Vec<usize> = Vec::with_capacity(batch);
        let mut addresses: Vec<Option<SockaddrStorage>> = Vec::with_capacity(batch);

        while !shutdown.is_cancelled() {
            received.clear();
            {
                let mut slices: [[IoSliceMut<'_>; 1]; MAX_BATCH] =
                    std::array::from_fn(|_| [IoSliceMut::new(&mut [])]);
                for (slice, buffer) in slices.iter_mut().zip(queries.iter_mut()) {
                    *slice = [IoSliceMut::new(buffer)];
                }
                match recvmmsg(
                    fd,
                    &mut receive_headers,
                    slices.iter_mut().take(batch),
                    MsgFlags::MSG_WAITFORONE,
                    None,
                ) {
                    Ok(messages) => {
                        for message in messages {
                            received.push((
                                message.bytes,
                                message.address,
                                message.flags.contains(MsgFlags::MSG_TRUNC),
                            ));
                        }
                    }
                    Err(Errno::EAGAIN | Errno::EINTR | Errno::ECONNREFUSED) => continue,
                    Err(error) => {
                        warn!(%error, "dns udp receive failed");
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                }
            }

            to_send.clear();
            addresses.clear();
            // One clock read per batch: the datagrams arrived together.
            let now_us = self.rrl_now();
            for (slot, (len, address, truncated)) in received.iter().enumerate() {
                let Some(peer) = address.as_ref().and_then(to_std) else {
                    continue;
                };
                if *truncated {
                    self.stats.count_query(Transport::Udp);
                    self.stats.count_dropped();
                    continue;
                }
                let query = &queries[slot][..(*len).min(QUERY_BUFFER)];
                let source = crate::server::canonical(peer.ip());
                if self.answer_with(query, source, Transport::Udp, now_us, &mut answers[slot]) {
                    to_send.push(slot);
                    addresses.push(*address);
                }
            }
            if to_send.is_empty() {
                continue;
            }

            let sent = {
                let slices: Vec<[IoSlice<'_>; 1]> = to_send
                    .iter()
                    .map(|&slot| [IoSlice::new(&answers[slot])])
                    .collect();
                match sendmmsg(
                    fd,
                    &mut send_headers,
                    &slices,
                    &addresses,
                    [],
                    MsgFlags::empty(),
                ) {
                    Ok(results) => results.count(),
                    Err(error) => {
                        debug!(%error, "dns udp sendmmsg failed");
                        0
                    }
                }
            };
            // Whatever sendmmsg did not take goes one by one, so one bad peer address
            // cannot drop the rest of the batch.
            for (index, &slot) in to_send.iter().enumerate().skip(sent) {
                let Some(peer) = addresses[index].as_ref().and_then(to_std) else {
                    continue;
                };
                if let Err(error) = socket.send_to(&answers[slot], peer) {
                    self.stats.count_send_error();
                    debug!(%peer, %error, "dns udp send failed");
                }
            }
        }
    }
}

fn to_std(address: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = address.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    address
        .as_sockaddr_in6()
        .map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
}

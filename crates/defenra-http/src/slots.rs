//! Origin slots per client: how many origin exchanges one client address, and one HTTP/2
//! connection, may have in flight at once (`origin_max_connections_per_client`).
//!
//! The per-origin cap bounds origin connections; without a cap per client, one client
//! holding exchanges without progressing (a slow upload, a download it does not read)
//! could take all of them and make every other client of the origin wait. With it, such
//! a client waits for its own slots.

use std::net::IpAddr;
use std::sync::Arc;

use dashmap::DashMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// One semaphore of `cap` permits per client address that has exchanges in flight or a
/// connection that keeps a [`ClientRef`]; an exchange holds one permit. An entry goes when
/// its last holder does, so the map is bounded by the clients being served.
pub(crate) struct ClientSlots {
    cap: usize,
    by_client: DashMap<IpAddr, Arc<Semaphore>>,
}

impl ClientSlots {
    pub(crate) fn new(cap: usize) -> Self {
        ClientSlots {
            cap,
            by_client: DashMap::new(),
        }
    }

    /// The cap per client (0: none).
    pub(crate) fn cap(&self) -> usize {
        self.cap
    }

    /// The slots of `client`, or `None` when there is no cap. A connection keeps the
    /// result for its next requests (`Conn::client_slots`), so a keep-alive client looks its
    /// address up once.
    pub(crate) fn of(self: &Arc<Self>, client: IpAddr) -> Option<ClientRef> {
        if self.cap == 0 {
            return None;
        }
        let slots = match self.by_client.get(&client) {
            Some(slots) => Arc::clone(&slots),
            None => Arc::clone(
                &self
                    .by_client
                    .entry(client)
                    .or_insert_with(|| Arc::new(Semaphore::new(self.cap))),
            ),
        };
        Some(ClientRef {
            owner: Arc::clone(self),
            client,
            slots,
        })
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_client.len()
    }
}

/// A hold on one client address's slots; the address's entry goes when the last hold does.
pub(crate) struct ClientRef {
    owner: Arc<ClientSlots>,
    client: IpAddr,
    slots: Arc<Semaphore>,
}

impl Clone for ClientRef {
    fn clone(&self) -> Self {
        ClientRef {
            owner: Arc::clone(&self.owner),
            client: self.client,
            slots: Arc::clone(&self.slots),
        }
    }
}

impl ClientRef {
    pub(crate) fn client(&self) -> IpAddr {
        self.client
    }

    /// One of the client's slots if one is free.
    pub(crate) fn try_acquire(&self) -> Option<ClientSlot> {
        let permit = Arc::clone(&self.slots).try_acquire_owned().ok()?;
        Some(ClientSlot {
            _permit: permit,
            _client: self.clone(),
        })
    }

    /// One of the client's slots, waiting for one of its own exchanges to end when all are
    /// taken.
    pub(crate) async fn acquire(&self) -> ClientSlot {
        let permit = Arc::clone(&self.slots)
            .acquire_owned()
            .await
            .expect("client slots are never closed");
        ClientSlot {
            _permit: permit,
            _client: self.clone(),
        }
    }
}

impl Drop for ClientRef {
    fn drop(&mut self) {
        // The map's reference and this one: nobody else holds the address's slots. (Checked
        // first, so that the common drop, with the connection's hold still alive, takes no
        // lock.)
        if Arc::strong_count(&self.slots) <= 2 {
            self.owner
                .by_client
                .remove_if(&self.client, |_, slots| Arc::strong_count(slots) <= 2);
        }
    }
}

/// One origin exchange's slot of its client; given back when dropped.
pub(crate) struct ClientSlot {
    // Declared first: the permit goes back before the hold is checked for the last one.
    _permit: OwnedSemaphorePermit,
    _client: ClientRef,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_address_has_its_own_slots_and_its_entry_goes_with_the_last_hold() {
        let slots = Arc::new(ClientSlots::new(2));
        let one: IpAddr = "192.0.2.1".parse().unwrap();
        let two: IpAddr = "192.0.2.2".parse().unwrap();
        let connection = slots.of(one).unwrap();
        let held = [connection.acquire().await, connection.acquire().await];
        {
            let third = connection.acquire();
            tokio::pin!(third);
            assert!(
                futures_poll_once(third.as_mut()).await.is_none(),
                "a third exchange of the same address waits"
            );
        }
        assert!(connection.try_acquire().is_none());
        let other = slots.of(two).unwrap().acquire().await;
        drop(other);
        assert_eq!(
            slots.len(),
            1,
            "the other address's entry went with its slot"
        );
        drop(connection);
        assert_eq!(slots.len(), 1, "exchanges in flight keep the entry");
        drop(held);
        assert_eq!(slots.len(), 0);
        assert!(Arc::new(ClientSlots::new(0)).of(one).is_none());
    }

    /// Polls `future` once: `Some` when it is ready.
    async fn futures_poll_once<F: std::future::Future + Unpin>(future: F) -> Option<F::Output> {
        let mut future = future;
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut future).poll(cx) {
                std::task::Poll::Ready(output) => Some(output),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }
}

//! Concurrent connections per client address, counted while a [`ConnTicket`] lives.
//!
//! Entries exist only while their address has connections open, so the map is bounded by
//! the listeners' own connection limits.

use std::net::IpAddr;
use std::sync::Arc;

use dashmap::DashMap;

#[derive(Debug, Default)]
pub(crate) struct ConnCounts {
    open: DashMap<IpAddr, u32>,
}

impl ConnCounts {
    /// Counts one more connection of `ip` unless it already has `cap`.
    pub(crate) fn acquire(self: &Arc<Self>, ip: IpAddr, cap: u32) -> Option<Counted> {
        let mut open = self.open.entry(ip).or_insert(0);
        if *open >= cap {
            let zero = *open == 0;
            drop(open);
            if zero {
                self.open.remove_if(&ip, |_, count| *count == 0);
            }
            return None;
        }
        *open += 1;
        Some(Counted {
            counts: Arc::clone(self),
            ip,
        })
    }

    /// Open connections of `ip`.
    pub(crate) fn count(&self, ip: IpAddr) -> u32 {
        self.open.get(&ip).map_or(0, |count| *count)
    }

    /// Addresses with connections open.
    pub(crate) fn addresses(&self) -> usize {
        self.open.len()
    }

    fn release(&self, ip: IpAddr) {
        if let Some(mut open) = self.open.get_mut(&ip) {
            *open = open.saturating_sub(1);
        }
        self.open.remove_if(&ip, |_, count| *count == 0);
    }
}

/// One counted connection; released when dropped.
#[derive(Debug)]
pub(crate) struct Counted {
    counts: Arc<ConnCounts>,
    ip: IpAddr,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.counts.release(self.ip);
    }
}

/// A connection the shield admitted. Keep it for the connection's life: dropping it gives
/// the address's slot back.
#[derive(Debug, Default)]
pub struct ConnTicket {
    /// Held for its `Drop`, which gives the slot back.
    pub(crate) _slot: Option<Counted>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_up_to_the_cap_and_releases_on_drop() {
        let counts = Arc::new(ConnCounts::default());
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let first = counts.acquire(ip, 2).expect("first");
        let second = counts.acquire(ip, 2).expect("second");
        assert!(counts.acquire(ip, 2).is_none());
        drop(first);
        let third = counts.acquire(ip, 2).expect("room again");
        drop((second, third));
        assert_eq!(counts.count(ip), 0);
        assert_eq!(counts.addresses(), 0, "no entry left behind");
        assert!(counts.acquire(ip, 0).is_none());
        assert_eq!(counts.addresses(), 0);
    }
}

//! A proxy's destination: an IP literal, or a host name resolved off the runtime and cached.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use defenra_config::L4Proxy;
use tokio::time::Instant;

/// Where one proxy forwards to. Built once per config change, shared by its connections.
pub(crate) struct Target {
    pub(crate) proxy_protocol: bool,
    addresses: Addresses,
}

enum Addresses {
    /// `destinationHost` was an IP literal: nothing to resolve.
    Literal(Arc<[SocketAddr]>),
    Name(Arc<NameCache>),
}

impl Target {
    pub(crate) fn new(proxy: &L4Proxy, cache_ttl: Duration) -> Self {
        let host = proxy.destination_host.as_str();
        let addresses = match host.parse::<IpAddr>() {
            Ok(ip) => Addresses::Literal(Arc::from([SocketAddr::new(ip, proxy.destination_port)])),
            Err(_) => Addresses::Name(Arc::new(NameCache {
                host: host.to_owned(),
                port: proxy.destination_port,
                ttl: cache_ttl,
                resolved: ArcSwapOption::empty(),
                failed: ArcSwapOption::empty(),
                refreshing: AtomicBool::new(false),
                lookups: AtomicU64::new(0),
            })),
        };
        Target {
            proxy_protocol: proxy.proxy_protocol,
            addresses,
        }
    }

    /// The destination's addresses, in the resolver's order. A literal costs nothing; a
    /// cached name costs one pointer load; a missing name waits for one lookup.
    pub(crate) async fn addresses(&self) -> io::Result<Arc<[SocketAddr]>> {
        match &self.addresses {
            Addresses::Literal(addresses) => Ok(Arc::clone(addresses)),
            Addresses::Name(cache) => cache.addresses().await,
        }
    }
}

/// One host name's last lookup. Several connections may miss at once and each look it up;
/// that only happens before the first answer, so it is not worth a lock.
struct NameCache {
    host: String,
    port: u16,
    ttl: Duration,
    resolved: ArcSwapOption<Resolved>,
    /// The last failed lookup while nothing was ever resolved. Clients arriving within
    /// `NEGATIVE_TTL` get this error at once instead of queueing a lookup each, so a flood
    /// toward a dead name cannot fill the blocking pool.
    failed: ArcSwapOption<Failure>,
    /// Set while a background refresh of a stale entry runs, so only one does.
    refreshing: AtomicBool,
    /// Lookups actually started, for tests.
    lookups: AtomicU64,
}

/// How long a failed lookup of a never-resolved name is remembered.
const NEGATIVE_TTL: Duration = Duration::from_secs(2);

struct Failure {
    kind: io::ErrorKind,
    message: String,
    until: Instant,
}

struct Resolved {
    addresses: Arc<[SocketAddr]>,
    expires_at: Instant,
}

impl NameCache {
    async fn addresses(self: &Arc<Self>) -> io::Result<Arc<[SocketAddr]>> {
        if let Some(resolved) = self.resolved.load_full() {
            if resolved.expires_at <= Instant::now()
                && !self.refreshing.swap(true, Ordering::AcqRel)
            {
                // Serve the stale answer now; refresh in the background.
                let cache = Arc::clone(self);
                tokio::spawn(async move {
                    if let Err(error) = cache.lookup().await {
                        tracing::warn!(host = %cache.host, %error, "destination lookup failed; keeping the previous addresses");
                    }
                    cache.refreshing.store(false, Ordering::Release);
                });
            }
            return Ok(Arc::clone(&resolved.addresses));
        }
        if let Some(failure) = self.failed.load_full()
            && failure.until > Instant::now()
        {
            return Err(io::Error::new(failure.kind, failure.message.clone()));
        }
        let result = self.lookup().await;
        if let Err(error) = &result {
            self.failed.store(Some(Arc::new(Failure {
                kind: error.kind(),
                message: error.to_string(),
                until: Instant::now() + NEGATIVE_TTL.min(self.ttl),
            })));
        }
        result
    }

    async fn lookup(&self) -> io::Result<Arc<[SocketAddr]>> {
        self.lookups.fetch_add(1, Ordering::Relaxed);
        // tokio runs getaddrinfo on its blocking pool, so the runtime never waits on it.
        let addresses: Arc<[SocketAddr]> = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|error| io::Error::new(error.kind(), format!("{}: {error}", self.host)))?
            .collect();
        if addresses.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} has no addresses", self.host),
            ));
        }
        self.failed.store(None);
        self.resolved.store(Some(Arc::new(Resolved {
            addresses: Arc::clone(&addresses),
            expires_at: Instant::now() + self.ttl,
        })));
        Ok(addresses)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use defenra_config::L4Protocol;

    fn proxy(host: &str) -> L4Proxy {
        L4Proxy {
            id: None,
            name: None,
            protocol: L4Protocol::Tcp,
            listen_port: 1,
            destination_host: host.into(),
            destination_port: 9000,
            proxy_protocol: false,
        }
    }

    #[tokio::test]
    async fn literal_needs_no_lookup() {
        let target = Target::new(&proxy("::1"), Duration::from_secs(1));
        let addresses = target.addresses().await.unwrap();
        assert_eq!(&*addresses, &["[::1]:9000".parse::<SocketAddr>().unwrap()]);
    }

    #[tokio::test]
    async fn localhost_is_resolved_then_cached() {
        let target = Target::new(&proxy("localhost"), Duration::from_secs(60));
        let first = target.addresses().await.unwrap();
        assert!(
            first
                .iter()
                .all(|a| a.ip().is_loopback() && a.port() == 9000)
        );
        let second = target.addresses().await.unwrap();
        assert!(
            Arc::ptr_eq(&first, &second),
            "second call should hit the cache"
        );
    }

    fn lookups(target: &Target) -> u64 {
        match &target.addresses {
            Addresses::Name(cache) => cache.lookups.load(Ordering::Relaxed),
            Addresses::Literal(_) => 0,
        }
    }

    #[tokio::test]
    async fn unknown_name_is_an_error_remembered_briefly() {
        let target = Target::new(&proxy("no-such-host.invalid"), Duration::from_secs(60));
        let error = target.addresses().await.unwrap_err();
        assert!(
            error.to_string().contains("no-such-host.invalid"),
            "{error}"
        );
        assert!(target.addresses().await.is_err());
        assert_eq!(
            lookups(&target),
            1,
            "the second call should not look up again"
        );
    }

    #[tokio::test]
    async fn cached_name_is_not_looked_up_again() {
        let target = Target::new(&proxy("localhost"), Duration::from_secs(60));
        for _ in 0..3 {
            target.addresses().await.unwrap();
        }
        assert_eq!(lookups(&target), 1);
    }
}

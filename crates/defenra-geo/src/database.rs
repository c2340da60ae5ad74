//! [`GeoDatabase`]: the agent's GeoIP database behind one atomic pointer, so a new file
//! (`geoipupdate`, a database that appears after start) replaces it without a restart.

use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::ArcSwapOption;

use crate::{GeoDetails, GeoLookup, Location, MaxMindGeo, Place};

/// The database in use, or none. Lookups do one atomic load and never block; whoever reads
/// the file calls [`GeoDatabase::replace`] when it has a new, valid database.
#[derive(Default)]
pub struct GeoDatabase {
    current: ArcSwapOption<MaxMindGeo>,
}

impl GeoDatabase {
    /// No database yet: every lookup answers `None` until the first [`replace`](Self::replace).
    pub fn empty() -> Self {
        GeoDatabase::default()
    }

    /// Makes `database` the one in use; lookups already running finish on the old one.
    pub fn replace(&self, database: MaxMindGeo) {
        self.current.store(Some(Arc::new(database)));
    }

    /// The database in use.
    pub fn current(&self) -> Option<Arc<MaxMindGeo>> {
        self.current.load_full()
    }

    pub fn is_loaded(&self) -> bool {
        self.current.load().is_some()
    }

    /// [`MaxMindGeo::details`] of the database in use.
    pub fn details(&self, ip: IpAddr) -> Option<Arc<GeoDetails>> {
        self.current.load().as_ref()?.details(ip)
    }
}

impl GeoLookup for GeoDatabase {
    fn locate(&self, ip: IpAddr) -> Option<Location> {
        self.current.load().as_ref()?.locate(ip)
    }

    fn place(&self, ip: IpAddr) -> Option<Place> {
        self.current.load().as_ref()?.place(ip)
    }
}

impl std::fmt::Debug for GeoDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeoDatabase")
            .field("current", &self.current.load().as_deref())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Continent;
    use crate::mmdb_writer::MmdbWriter;

    fn database(country: &str) -> MaxMindGeo {
        let mut writer = MmdbWriter::new();
        writer.insert("81.0.0.0".parse().unwrap(), 8, Some(country), Some("EU"));
        MaxMindGeo::from_bytes(writer.to_bytes()).unwrap()
    }

    #[test]
    fn lookups_follow_the_database_in_use() {
        let ip: IpAddr = "81.2.3.4".parse().unwrap();
        let holder = GeoDatabase::empty();
        assert_eq!(holder.place(ip), None);
        assert!(!holder.is_loaded());
        holder.replace(database("DE"));
        assert_eq!(holder.locate(ip).unwrap().country.as_deref(), Some("de"));
        assert_eq!(holder.place(ip).unwrap().continent, Some(Continent::Europe));
        // Shared as a `dyn GeoLookup` (as the DNS service holds it), it sees replacements.
        let holder = Arc::new(holder);
        let shared: Arc<dyn GeoLookup> = holder.clone();
        holder.replace(database("FR"));
        assert_eq!(shared.locate(ip).unwrap().country.as_deref(), Some("fr"));
        assert_eq!(
            holder.details(ip).unwrap().country_code.as_deref(),
            Some("FR")
        );
    }
}

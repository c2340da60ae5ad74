//! [`MaxMindGeo`]: a MaxMind-format database (GeoLite2/GeoIP2 City or Country, DB-IP lite)
//! read into memory once, with a bounded cache in front of it.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use quick_cache::sync::Cache;
use serde::Deserialize;

use crate::{Continent, CountryCode, GeoError, GeoLookup, Location, Place};

/// Cached networks. One entry is about 40 bytes, so the cache stays under 3 MiB.
const DEFAULT_CACHE_ENTRIES: usize = 65_536;
/// Cached networks for [`MaxMindGeo::details`]: a few hundred bytes each, under 4 MiB.
const DETAILS_CACHE_ENTRIES: usize = 16_384;

/// What a City database says about an address (a Country database fills only the
/// country and continent), as nginx's geoip module exposes it: for the WAF's
/// `ngx.var.geoip_*`. Names are MaxMind's English ones.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GeoDetails {
    /// ISO 3166-1 alpha-2, upper case as MaxMind writes it (`DE`).
    pub country_code: Option<String>,
    /// `Germany`.
    pub country_name: Option<String>,
    /// `EU`, `NA`, ...
    pub continent_code: Option<String>,
    /// `Berlin`.
    pub city: Option<String>,
    /// The largest subdivision's ISO 3166-2 code without the country (`BE`), and its name.
    pub region_code: Option<String>,
    pub region_name: Option<String>,
    pub postal_code: Option<String>,
    pub latitude: Option<f64>,
    pub longitude: Option<f64>,
}

/// Looks addresses up in a MaxMind-format database.
///
/// Answers are cached per /24 (IPv4) or /56 (IPv6): resolvers behind one such network are
/// nearly always in one place, and the cache keeps the query path from walking the tree
/// for every query.
pub struct MaxMindGeo {
    reader: maxminddb::Reader<Vec<u8>>,
    /// `None` values are cached too: an address the database does not know stays unknown.
    cache: Cache<CacheKey, Option<Place>>,
    details: Cache<CacheKey, Option<Arc<GeoDetails>>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum CacheKey {
    /// The address's /24.
    V4(u32),
    /// The address's /56.
    V6(u64),
}

/// The two fields we need from a City or Country record; everything else is skipped.
#[derive(Deserialize)]
struct Record<'a> {
    #[serde(borrow, default)]
    country: Option<IsoCode<'a>>,
    #[serde(borrow, default)]
    continent: Option<ContinentCode<'a>>,
}

#[derive(Deserialize)]
struct IsoCode<'a> {
    #[serde(borrow, default)]
    iso_code: Option<&'a str>,
}

#[derive(Deserialize)]
struct ContinentCode<'a> {
    #[serde(borrow, default)]
    code: Option<&'a str>,
}

impl MaxMindGeo {
    /// Reads the database at `path` into memory.
    ///
    /// # Errors
    ///
    /// [`GeoError::Read`] when the file cannot be read, [`GeoError::Invalid`] when it is not
    /// a MaxMind DB.
    pub fn open(path: &Path) -> Result<Self, GeoError> {
        let bytes = std::fs::read(path).map_err(|source| GeoError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_bytes(bytes).map_err(|error| match error {
            GeoError::Invalid { message, .. } => GeoError::Invalid {
                path: path.display().to_string(),
                message,
            },
            other => other,
        })
    }

    /// Uses an in-memory database.
    ///
    /// # Errors
    ///
    /// [`GeoError::Invalid`] when `bytes` is not a MaxMind DB.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, GeoError> {
        let reader = maxminddb::Reader::from_source(bytes).map_err(|error| GeoError::Invalid {
            path: "<memory>".to_owned(),
            message: error.to_string(),
        })?;
        Ok(MaxMindGeo {
            reader,
            cache: Cache::new(DEFAULT_CACHE_ENTRIES),
            details: Cache::new(DETAILS_CACHE_ENTRIES),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        })
    }

    /// The database type from its metadata (`GeoLite2-City`, `DBIP-City-Lite`, ...).
    pub fn database_type(&self) -> &str {
        &self.reader.metadata().database_type
    }

    /// Cache hits and misses since start.
    pub fn cache_counts(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    /// Everything the database knows about `ip`, cached per /24 (IPv4) or /56 (IPv6) like
    /// [`GeoLookup::place`]; `None` when it knows nothing.
    pub fn details(&self, ip: IpAddr) -> Option<Arc<GeoDetails>> {
        let (ip, key) = cache_key(ip);
        if let Some(details) = self.details.get(&key) {
            return details;
        }
        let details = self.details_uncached(ip).map(Arc::new);
        self.details.insert(key, details.clone());
        details
    }

    fn details_uncached(&self, ip: IpAddr) -> Option<GeoDetails> {
        let result = self.reader.lookup(ip).ok()?;
        let record = result.decode::<CityRecord<'_>>().ok()??;
        let owned = |text: Option<&str>| text.map(str::to_owned);
        let region = record
            .subdivisions
            .as_ref()
            .and_then(|subdivisions| subdivisions.first());
        let details = GeoDetails {
            country_code: owned(record.country.as_ref().and_then(|c| c.iso_code)),
            country_name: owned(record.country.as_ref().and_then(|c| english(&c.names))),
            continent_code: owned(record.continent.as_ref().and_then(|c| c.code)),
            city: owned(record.city.as_ref().and_then(|c| english(&c.names))),
            region_code: owned(region.and_then(|r| r.iso_code)),
            region_name: owned(region.and_then(|r| english(&r.names))),
            postal_code: owned(record.postal.as_ref().and_then(|p| p.code)),
            latitude: record.location.as_ref().and_then(|l| l.latitude),
            longitude: record.location.as_ref().and_then(|l| l.longitude),
        };
        (details != GeoDetails::default()).then_some(details)
    }

    fn lookup_uncached(&self, ip: IpAddr) -> Option<Place> {
        let result = self.reader.lookup(ip).ok()?;
        let record = result.decode::<Record<'_>>().ok()??;
        let place = Place {
            country: record
                .country
                .and_then(|country| country.iso_code)
                .and_then(CountryCode::parse),
            continent: record
                .continent
                .and_then(|continent| continent.code)
                .and_then(Continent::from_code),
        };
        (place.country.is_some() || place.continent.is_some()).then_some(place)
    }
}

impl GeoLookup for MaxMindGeo {
    fn locate(&self, ip: IpAddr) -> Option<Location> {
        self.place(ip).map(Place::to_location)
    }

    fn place(&self, ip: IpAddr) -> Option<Place> {
        let (ip, key) = cache_key(ip);
        if let Some(place) = self.cache.get(&key) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return place;
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let place = self.lookup_uncached(ip);
        self.cache.insert(key, place);
        place
    }
}

/// `ip` with IPv4-mapped IPv6 addresses unmapped, and the network it is cached under.
fn cache_key(ip: IpAddr) -> (IpAddr, CacheKey) {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    let key = match ip {
        IpAddr::V4(v4) => CacheKey::V4(u32::from(v4) & 0xffff_ff00),
        IpAddr::V6(v6) => CacheKey::V6((u128::from(v6) >> 64) as u64 & !0xff),
    };
    (ip, key)
}

/// The City record's fields the WAF shows; everything else (other languages, geoname ids,
/// accuracy) is skipped.
#[derive(Deserialize)]
struct CityRecord<'a> {
    #[serde(borrow, default)]
    city: Option<Named<'a>>,
    #[serde(borrow, default)]
    continent: Option<ContinentCode<'a>>,
    #[serde(borrow, default)]
    country: Option<NamedCode<'a>>,
    #[serde(default)]
    location: Option<Coordinates>,
    #[serde(borrow, default)]
    postal: Option<PostalCode<'a>>,
    #[serde(borrow, default)]
    subdivisions: Option<Vec<NamedCode<'a>>>,
}

#[derive(Deserialize)]
struct Named<'a> {
    #[serde(borrow, default)]
    names: Option<Names<'a>>,
}

#[derive(Deserialize)]
struct NamedCode<'a> {
    #[serde(borrow, default)]
    iso_code: Option<&'a str>,
    #[serde(borrow, default)]
    names: Option<Names<'a>>,
}

#[derive(Deserialize)]
struct Names<'a> {
    #[serde(borrow, default)]
    en: Option<&'a str>,
}

#[derive(Deserialize)]
struct PostalCode<'a> {
    #[serde(borrow, default)]
    code: Option<&'a str>,
}

#[derive(Deserialize)]
struct Coordinates {
    #[serde(default)]
    latitude: Option<f64>,
    #[serde(default)]
    longitude: Option<f64>,
}

fn english<'a>(names: &Option<Names<'a>>) -> Option<&'a str> {
    names.as_ref().and_then(|names| names.en)
}

impl std::fmt::Debug for MaxMindGeo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MaxMindGeo")
            .field("database_type", &self.database_type())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mmdb_writer::MmdbWriter;

    fn database() -> MaxMindGeo {
        let mut writer = MmdbWriter::new();
        writer.insert("81.0.0.0".parse().unwrap(), 8, Some("DE"), Some("EU"));
        writer.insert("2a00::".parse().unwrap(), 12, Some("fr"), Some("eu"));
        writer.insert("203.0.113.0".parse().unwrap(), 24, None, Some("OC"));
        MaxMindGeo::from_bytes(writer.to_bytes()).unwrap()
    }

    #[test]
    fn finds_country_and_continent_for_v4_v6_and_mapped_addresses() {
        let geo = database();
        let de = Location {
            country: Some("de".into()),
            continent: Some(Continent::Europe),
        };
        assert_eq!(geo.locate("81.2.3.4".parse().unwrap()), Some(de.clone()));
        assert_eq!(geo.locate("::ffff:81.2.3.4".parse().unwrap()), Some(de));
        assert_eq!(
            geo.locate("2a00:1::1".parse().unwrap()).unwrap().country,
            Some("fr".into())
        );
        assert_eq!(
            geo.locate("203.0.113.9".parse().unwrap()),
            Some(Location {
                country: None,
                continent: Some(Continent::Oceania)
            })
        );
        assert_eq!(geo.locate("192.0.2.1".parse().unwrap()), None);
    }

    #[test]
    fn details_come_from_city_records_and_country_databases_alike() {
        use crate::mmdb_writer::CityRecord;
        let mut writer = MmdbWriter::new();
        writer.insert_city(
            "81.0.0.0".parse().unwrap(),
            8,
            &CityRecord {
                country: Some("DE"),
                country_name: Some("Germany"),
                continent: Some("EU"),
                city: Some("Berlin"),
                region_code: Some("BE"),
                region_name: Some("Land Berlin"),
                postal_code: Some("10115"),
                latitude: Some(52.5244),
                longitude: Some(13.4105),
            },
        );
        let geo = MaxMindGeo::from_bytes(writer.to_bytes()).unwrap();
        let berlin = geo.details("::ffff:81.2.3.4".parse().unwrap()).unwrap();
        assert_eq!(
            *berlin,
            GeoDetails {
                country_code: Some("DE".into()),
                country_name: Some("Germany".into()),
                continent_code: Some("EU".into()),
                city: Some("Berlin".into()),
                region_code: Some("BE".into()),
                region_name: Some("Land Berlin".into()),
                postal_code: Some("10115".into()),
                latitude: Some(52.5244),
                longitude: Some(13.4105),
            }
        );
        assert!(Arc::ptr_eq(
            &berlin,
            &geo.details("81.2.3.200".parse().unwrap()).unwrap()
        ));
        assert_eq!(geo.details("192.0.2.1".parse().unwrap()), None);
        // The country lookup reads the same record.
        assert_eq!(
            geo.locate("81.2.3.4".parse().unwrap()).unwrap().country,
            Some("de".into())
        );

        let country_only = database();
        let details = country_only.details("81.2.3.4".parse().unwrap()).unwrap();
        assert_eq!(details.country_code.as_deref(), Some("DE"));
        assert_eq!(details.continent_code.as_deref(), Some("EU"));
        assert_eq!((details.city.as_deref(), details.latitude), (None, None));
    }

    #[test]
    fn repeated_lookups_in_one_slash_24_hit_the_cache() {
        let geo = database();
        geo.place("81.2.3.4".parse().unwrap());
        geo.place("81.2.3.200".parse().unwrap());
        geo.place("192.0.2.1".parse().unwrap());
        geo.place("192.0.2.2".parse().unwrap());
        assert_eq!(geo.cache_counts(), (2, 2));
    }

    #[test]
    fn a_file_that_is_not_a_database_is_an_error() {
        let dir = std::env::temp_dir().join(format!("defenra-geo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.mmdb");
        std::fs::write(&path, b"not a database").unwrap();
        let error = MaxMindGeo::open(&path).unwrap_err();
        assert!(error.to_string().contains("bad.mmdb"), "{error}");
        let missing = MaxMindGeo::open(&dir.join("missing.mmdb")).unwrap_err();
        assert!(matches!(missing, GeoError::Read { .. }), "{missing}");
        std::fs::remove_dir_all(&dir).ok();
    }
}

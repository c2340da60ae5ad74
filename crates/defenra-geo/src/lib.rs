//! GeoIP lookups and GeoDNS answer selection for the Defenra edge agent.
//!
//! This crate owns: the [`GeoLookup`] capability and its implementations ([`MaxMindGeo`]
//! over a MaxMind-format database with a bounded cache, [`GeoDatabase`] holding the one in use
//! behind an atomic pointer so it can be replaced live, [`StaticGeo`] as a table for tests),
//! the City details of an address ([`MaxMindGeo::details`], for reports to Core and the WAF's
//! `geoip_*` variables),
//! the country centroid table, and [`GeoPlan`], the per-domain selection chain compiled at
//! reload time (pools → map → fallback → continent → nearest → default → `--agent-ip`).
//!
//! It must never do I/O on a query path (the database is read once, in [`MaxMindGeo::open`]),
//! never hold a lock across a lookup of the selection plan, and never know DNS wire formats.
//!
//! Start reading at [`GeoPlan::compile`] and [`GeoPlan::choose`].

mod centroids;
mod database;
mod maxmind;
pub mod mmdb_writer;
mod select;
mod static_geo;

use std::fmt;
use std::net::IpAddr;

pub use centroids::{centroid, distance_km};
pub use database::GeoDatabase;
pub use maxmind::{GeoDetails, MaxMindGeo};
pub use select::{GeoPlan, LOAD_THRESHOLD, Rule, Selection};
pub use static_geo::StaticGeo;

/// Where an address is, as a GeoIP database says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Location {
    /// ISO 3166-1 alpha-2 code, lower case (`de`).
    pub country: Option<String>,
    pub continent: Option<Continent>,
}

/// The copyable, allocation-free form of a [`Location`], used on the DNS query path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Place {
    pub country: Option<CountryCode>,
    pub continent: Option<Continent>,
}

impl Place {
    /// The owned form.
    pub fn to_location(self) -> Location {
        Location {
            country: self.country.map(|code| code.as_str().to_owned()),
            continent: self.continent,
        }
    }

    /// The compact form of `location`; a country that is not two ASCII letters is dropped.
    pub fn from_location(location: &Location) -> Place {
        Place {
            country: location.country.as_deref().and_then(CountryCode::parse),
            continent: location.continent,
        }
    }
}

/// Finds where an IP address is. Implementations must be cheap enough to call once per
/// DNS query (cache what is expensive) and must never block on I/O.
pub trait GeoLookup: Send + Sync {
    /// The location of `ip`, or `None` when the database does not know it.
    fn locate(&self, ip: IpAddr) -> Option<Location>;

    /// The same answer as [`GeoLookup::locate`] without allocating. The default converts
    /// `locate`'s result; [`MaxMindGeo`] and [`StaticGeo`] answer directly.
    fn place(&self, ip: IpAddr) -> Option<Place> {
        self.locate(ip)
            .map(|location| Place::from_location(&location))
    }
}

/// A lower-case ISO 3166-1 alpha-2 country code, stored inline.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CountryCode([u8; 2]);

impl CountryCode {
    /// Accepts exactly two ASCII letters, in either case.
    pub fn parse(text: &str) -> Option<CountryCode> {
        match text.as_bytes() {
            [a, b] if a.is_ascii_alphabetic() && b.is_ascii_alphabetic() => Some(CountryCode([
                a.to_ascii_lowercase(),
                b.to_ascii_lowercase(),
            ])),
            _ => None,
        }
    }

    pub fn as_str(&self) -> &str {
        // Both bytes are ASCII letters (checked in `parse`), so this never fails.
        std::str::from_utf8(&self.0).unwrap_or("??")
    }
}

impl fmt::Debug for CountryCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for CountryCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The seven continents, as MaxMind codes them (`EU`, `NA`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Continent {
    Africa,
    Antarctica,
    Asia,
    Europe,
    NorthAmerica,
    Oceania,
    SouthAmerica,
}

impl Continent {
    pub const ALL: [Continent; 7] = [
        Continent::Africa,
        Continent::Antarctica,
        Continent::Asia,
        Continent::Europe,
        Continent::NorthAmerica,
        Continent::Oceania,
        Continent::SouthAmerica,
    ];

    /// Parses a MaxMind continent code (`AF`, `AN`, `AS`, `EU`, `NA`, `OC`, `SA`),
    /// case-insensitively.
    pub fn from_code(code: &str) -> Option<Continent> {
        Some(match code.to_ascii_uppercase().as_str() {
            "AF" => Continent::Africa,
            "AN" => Continent::Antarctica,
            "AS" => Continent::Asia,
            "EU" => Continent::Europe,
            "NA" => Continent::NorthAmerica,
            "OC" => Continent::Oceania,
            "SA" => Continent::SouthAmerica,
            _ => return None,
        })
    }

    /// The MaxMind code (`EU`).
    pub fn code(self) -> &'static str {
        match self {
            Continent::Africa => "AF",
            Continent::Antarctica => "AN",
            Continent::Asia => "AS",
            Continent::Europe => "EU",
            Continent::NorthAmerica => "NA",
            Continent::Oceania => "OC",
            Continent::SouthAmerica => "SA",
        }
    }

    /// The GeoDNS key Core uses for this continent (`europe`, `north-america`).
    pub fn key(self) -> &'static str {
        match self {
            Continent::Africa => "africa",
            Continent::Antarctica => "antarctica",
            Continent::Asia => "asia",
            Continent::Europe => "europe",
            Continent::NorthAmerica => "north-america",
            Continent::Oceania => "oceania",
            Continent::SouthAmerica => "south-america",
        }
    }

    /// Parses a GeoDNS map key naming a continent: Core's names, plus `eu` and `oc`.
    /// The other two-letter continent codes (`af`, `as`, `na`, `sa`, `an`) are also
    /// country codes (Afghanistan, American Samoa, Namibia, Saudi Arabia, Netherlands
    /// Antilles) and stay countries.
    pub fn from_key(key: &str) -> Option<Continent> {
        Some(match key {
            "eu" => Continent::Europe,
            "oc" => Continent::Oceania,
            "north_america" | "northamerica" => Continent::NorthAmerica,
            "south_america" | "southamerica" => Continent::SouthAmerica,
            _ => return Continent::ALL.into_iter().find(|c| c.key() == key),
        })
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// Why a GeoIP database could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GeoError {
    #[error("cannot read geoip database {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a usable maxmind database: {message}")]
    Invalid { path: String, message: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continent_keys_round_trip_and_two_letter_codes_stay_countries() {
        for continent in Continent::ALL {
            assert_eq!(Continent::from_key(continent.key()), Some(continent));
            assert_eq!(Continent::from_code(continent.code()), Some(continent));
        }
        assert_eq!(Continent::from_key("eu"), Some(Continent::Europe));
        assert_eq!(Continent::from_key("oc"), Some(Continent::Oceania));
        for country in ["af", "as", "na", "sa", "an", "us", "de"] {
            assert_eq!(Continent::from_key(country), None, "{country}");
        }
    }

    #[test]
    fn country_codes_are_two_letters_lower_case() {
        assert_eq!(CountryCode::parse("DE").unwrap().as_str(), "de");
        assert!(CountryCode::parse("d").is_none());
        assert!(CountryCode::parse("deu").is_none());
        assert!(CountryCode::parse("d1").is_none());
        let place = Place::from_location(&Location {
            country: Some("FR".into()),
            continent: Some(Continent::Europe),
        });
        assert_eq!(place.to_location().country.as_deref(), Some("fr"));
    }
}

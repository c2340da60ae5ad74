//! `ngx.var.geoip_*`: the [`ClientLocator`] capability the host provides, and the lookup
//! done at most once per request, only when a script reads one of those variables.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::ArcSwapOption;

/// Where a client address is, for the `ngx.var.geoip_*` variables. The agent implements it
/// over its GeoIP database; the WAF never knows which database, and does not depend on the
/// crate that reads it.
pub trait ClientLocator: Send + Sync {
    /// Fills `location`, which arrives empty, with what is known about `ip`; unknown fields
    /// stay empty. Called on a request thread, at most once per request and only when the
    /// script reads a `geoip_*` variable: it must not block on I/O (cache what is
    /// expensive). `location`'s strings are reused between requests, so filling them with
    /// `push_str` allocates nothing once they have grown.
    fn locate(&self, ip: IpAddr, location: &mut ClientLocation);
}

/// What a [`ClientLocator`] knows about an address; an empty string is unknown (and the
/// variable reads as `nil`). The names follow nginx's geoip module.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClientLocation {
    /// `geoip_country_code`: ISO 3166-1 alpha-2, upper case (`DE`).
    pub country_code: String,
    /// `geoip_country_name` (`Germany`).
    pub country_name: String,
    /// `geoip_city_continent_code` (`EU`).
    pub continent_code: String,
    /// `geoip_city` (`Berlin`).
    pub city: String,
    /// `geoip_region`: the region's code (`BE`), as nginx's module gives it.
    pub region: String,
    /// `geoip_region_name` (`Land Berlin`).
    pub region_name: String,
    /// `geoip_postal_code`.
    pub postal_code: String,
    /// `geoip_latitude`, `geoip_longitude` (printed with four decimals, as nginx does).
    pub latitude: Option<f64>,
    pub longitude: Option<f64>,
}

impl ClientLocation {
    fn clear(&mut self) {
        for text in [
            &mut self.country_code,
            &mut self.country_name,
            &mut self.continent_code,
            &mut self.city,
            &mut self.region,
            &mut self.region_name,
            &mut self.postal_code,
        ] {
            text.clear();
        }
        self.latitude = None;
        self.longitude = None;
    }
}

/// The engine's current locator, swapped by `WafEngine::set_locator` (a GeoIP database
/// replaced at run time) and read by every Lua state.
pub(crate) type LocatorCell = ArcSwapOption<Locator>;

/// A [`ClientLocator`] in a sized box, as `ArcSwapOption` needs.
pub(crate) struct Locator(pub(crate) Arc<dyn ClientLocator>);

/// One request's location: looked up on the first `geoip_*` read.
#[derive(Default)]
pub(crate) struct RequestLocation {
    looked_up: bool,
    location: ClientLocation,
    /// The formatted coordinate of the last read.
    number: String,
}

impl RequestLocation {
    /// Forgets the previous request's location (keeping the buffers).
    pub(crate) fn reset(&mut self) {
        self.looked_up = false;
    }

    /// The value of `geoip_<field>` for `ip`, `None` when unknown or not a geoip variable.
    pub(crate) fn field(
        &mut self,
        field: &[u8],
        ip: IpAddr,
        locator: &LocatorCell,
    ) -> Option<&str> {
        if !self.looked_up {
            self.looked_up = true;
            self.location.clear();
            if let Some(locator) = &*locator.load() {
                locator.0.locate(ip, &mut self.location);
            }
        }
        let location = &self.location;
        let text = match field {
            b"country_code" => &location.country_code,
            b"country_name" => &location.country_name,
            b"city_continent_code" => &location.continent_code,
            b"city" => &location.city,
            b"region" => &location.region,
            b"region_name" => &location.region_name,
            b"postal_code" => &location.postal_code,
            b"latitude" | b"longitude" => {
                let value = if field == b"latitude" {
                    location.latitude
                } else {
                    location.longitude
                }?;
                self.number.clear();
                let _ = write!(self.number, "{value:.4}");
                return Some(&self.number);
            }
            _ => return None,
        };
        (!text.is_empty()).then_some(text.as_str())
    }
}

//! The WAF's `ngx.var.geoip_*` from the agent's GeoIP database: `defenra_waf::ClientLocator`
//! over `defenra_geo::GeoDatabase` (the two crates do not know each other).

use std::net::IpAddr;
use std::sync::Arc;

use defenra_geo::GeoDatabase;
use defenra_waf::{ClientLocation, ClientLocator};

/// Answers from the same database (and the same kind of per-network cache) as GeoDNS,
/// whichever file is in use: a replaced database applies from the next lookup.
pub(crate) struct GeoLocator(pub(crate) Arc<GeoDatabase>);

impl ClientLocator for GeoLocator {
    fn locate(&self, ip: IpAddr, location: &mut ClientLocation) {
        let Some(details) = self.0.details(ip) else {
            return;
        };
        for (to, from) in [
            (&mut location.country_code, &details.country_code),
            (&mut location.country_name, &details.country_name),
            (&mut location.continent_code, &details.continent_code),
            (&mut location.city, &details.city),
            (&mut location.region, &details.region_code),
            (&mut location.region_name, &details.region_name),
            (&mut location.postal_code, &details.postal_code),
        ] {
            if let Some(from) = from {
                to.push_str(from);
            }
        }
        location.latitude = details.latitude;
        location.longitude = details.longitude;
    }
}

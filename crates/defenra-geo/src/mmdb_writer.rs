//! A minimal writer of MaxMind DB files (format 2.0) holding country and continent codes,
//! or City records (names, subdivision, postal code, coordinates).
//!
//! Tests and the DNS benchmark use it to make small GeoIP databases at run time, so nothing
//! that expires or carries a licence is checked in. It writes an IPv6 tree with 24-bit
//! records; IPv4 networks live under `::/96`, where readers look for them. It is not meant
//! for production databases: networks should be inserted from the widest to the narrowest.

use std::net::IpAddr;

/// Builds a database in memory; [`MmdbWriter::to_bytes`] returns the file.
#[derive(Debug, Clone)]
pub struct MmdbWriter {
    nodes: Vec<[Slot; 2]>,
    data: Vec<u8>,
    database_type: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Empty,
    Node(u32),
    Data(u32),
}

impl Default for MmdbWriter {
    fn default() -> Self {
        MmdbWriter::new()
    }
}

impl MmdbWriter {
    pub fn new() -> Self {
        MmdbWriter {
            nodes: vec![[Slot::Empty, Slot::Empty]],
            data: Vec::new(),
            database_type: "GeoLite2-Country".to_owned(),
        }
    }

    /// Maps `network/prefix_len` to a record like GeoLite2-Country's: `country.iso_code`
    /// (upper case, as MaxMind writes it) and `continent.code`, either of which may be
    /// left out. A prefix longer than the address is clamped.
    pub fn insert(
        &mut self,
        network: IpAddr,
        prefix_len: u8,
        country: Option<&str>,
        continent: Option<&str>,
    ) {
        let offset = self.write_record(country, continent);
        self.insert_offset(network, prefix_len, offset);
    }

    /// Maps `network/prefix_len` to a record like GeoLite2-City's (names in English only);
    /// the database type becomes `GeoLite2-City`.
    pub fn insert_city(&mut self, network: IpAddr, prefix_len: u8, city: &CityRecord<'_>) {
        self.database_type = "GeoLite2-City".to_owned();
        let offset = self.write_city(city);
        self.insert_offset(network, prefix_len, offset);
    }

    fn insert_offset(&mut self, network: IpAddr, prefix_len: u8, offset: u32) {
        let (bits, prefix_len) = match network {
            IpAddr::V4(v4) => (
                u128::from(u32::from(v4)),
                96 + u32::from(prefix_len.min(32)),
            ),
            IpAddr::V6(v6) => (u128::from(v6), u32::from(prefix_len.min(128))),
        };
        if prefix_len == 0 {
            return;
        }
        let mut current = 0usize;
        for depth in 0..prefix_len {
            let bit = ((bits >> (127 - depth)) & 1) as usize;
            if depth + 1 == prefix_len {
                self.nodes[current][bit] = Slot::Data(offset);
                break;
            }
            current = match self.nodes[current][bit] {
                Slot::Node(next) => next as usize,
                inherited => {
                    // A wider network's data (or nothing) continues on both sides below.
                    let inherited = match inherited {
                        Slot::Data(_) => inherited,
                        _ => Slot::Empty,
                    };
                    let next = self.nodes.len();
                    self.nodes.push([inherited, inherited]);
                    self.nodes[current][bit] = Slot::Node(next as u32);
                    next
                }
            };
        }
    }

    /// The complete database file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let node_count = self.nodes.len() as u32;
        let mut out = Vec::with_capacity(self.nodes.len() * 6 + 16 + self.data.len() + 256);
        for node in &self.nodes {
            for slot in node {
                let value = match *slot {
                    Slot::Empty => node_count,
                    Slot::Node(index) => index,
                    Slot::Data(offset) => node_count + 16 + offset,
                };
                out.extend_from_slice(&value.to_be_bytes()[1..]);
            }
        }
        out.extend_from_slice(&[0u8; 16]);
        out.extend_from_slice(&self.data);
        out.extend_from_slice(b"\xAB\xCD\xEFMaxMind.com");
        write_control(&mut out, TYPE_MAP, 9);
        write_string(&mut out, "binary_format_major_version");
        write_uint(&mut out, TYPE_UINT16, 2, 2);
        write_string(&mut out, "binary_format_minor_version");
        write_uint(&mut out, TYPE_UINT16, 2, 0);
        write_string(&mut out, "build_epoch");
        write_uint(&mut out, TYPE_UINT64, 8, 1_700_000_000);
        write_string(&mut out, "database_type");
        write_string(&mut out, &self.database_type);
        write_string(&mut out, "description");
        write_control(&mut out, TYPE_MAP, 1);
        write_string(&mut out, "en");
        write_string(&mut out, "defenra test database");
        write_string(&mut out, "ip_version");
        write_uint(&mut out, TYPE_UINT16, 2, 6);
        write_string(&mut out, "languages");
        write_control(&mut out, TYPE_ARRAY, 1);
        write_string(&mut out, "en");
        write_string(&mut out, "node_count");
        write_uint(&mut out, TYPE_UINT32, 4, u64::from(node_count));
        write_string(&mut out, "record_size");
        write_uint(&mut out, TYPE_UINT16, 2, 24);
        out
    }

    fn write_record(&mut self, country: Option<&str>, continent: Option<&str>) -> u32 {
        let offset = self.data.len() as u32;
        let out = &mut self.data;
        write_control(
            out,
            TYPE_MAP,
            usize::from(country.is_some()) + usize::from(continent.is_some()),
        );
        if let Some(code) = continent {
            write_string(out, "continent");
            write_control(out, TYPE_MAP, 1);
            write_string(out, "code");
            write_string(out, &code.to_ascii_uppercase());
        }
        if let Some(code) = country {
            write_string(out, "country");
            write_control(out, TYPE_MAP, 1);
            write_string(out, "iso_code");
            write_string(out, &code.to_ascii_uppercase());
        }
        offset
    }
}

/// A City record for [`MmdbWriter::insert_city`]; `None` fields are left out.
#[derive(Debug, Clone, Copy, Default)]
pub struct CityRecord<'a> {
    /// ISO 3166-1 alpha-2 (written upper case).
    pub country: Option<&'a str>,
    pub country_name: Option<&'a str>,
    /// `EU`, `NA`, ... (written upper case).
    pub continent: Option<&'a str>,
    pub city: Option<&'a str>,
    /// The subdivision's ISO 3166-2 code without the country (`BE`) and its name.
    pub region_code: Option<&'a str>,
    pub region_name: Option<&'a str>,
    pub postal_code: Option<&'a str>,
    pub latitude: Option<f64>,
    pub longitude: Option<f64>,
}

impl MmdbWriter {
    fn write_city(&mut self, record: &CityRecord<'_>) -> u32 {
        let offset = self.data.len() as u32;
        let out = &mut self.data;
        let has_location = record.latitude.is_some() || record.longitude.is_some();
        let has_region = record.region_code.is_some() || record.region_name.is_some();
        let fields = [
            record.continent.is_some(),
            record.country.is_some() || record.country_name.is_some(),
            record.city.is_some(),
            has_region,
            record.postal_code.is_some(),
            has_location,
        ];
        write_control(out, TYPE_MAP, fields.iter().filter(|&&f| f).count());
        if let Some(code) = record.continent {
            write_string(out, "continent");
            write_control(out, TYPE_MAP, 1);
            write_string(out, "code");
            write_string(out, &code.to_ascii_uppercase());
        }
        if record.country.is_some() || record.country_name.is_some() {
            write_string(out, "country");
            write_control(
                out,
                TYPE_MAP,
                usize::from(record.country.is_some()) + usize::from(record.country_name.is_some()),
            );
            if let Some(code) = record.country {
                write_string(out, "iso_code");
                write_string(out, &code.to_ascii_uppercase());
            }
            if let Some(name) = record.country_name {
                write_names(out, name);
            }
        }
        if let Some(name) = record.city {
            write_string(out, "city");
            write_control(out, TYPE_MAP, 1);
            write_names(out, name);
        }
        if has_region {
            write_string(out, "subdivisions");
            write_control(out, TYPE_ARRAY, 1);
            write_control(
                out,
                TYPE_MAP,
                usize::from(record.region_code.is_some())
                    + usize::from(record.region_name.is_some()),
            );
            if let Some(code) = record.region_code {
                write_string(out, "iso_code");
                write_string(out, code);
            }
            if let Some(name) = record.region_name {
                write_names(out, name);
            }
        }
        if let Some(code) = record.postal_code {
            write_string(out, "postal");
            write_control(out, TYPE_MAP, 1);
            write_string(out, "code");
            write_string(out, code);
        }
        if has_location {
            write_string(out, "location");
            write_control(
                out,
                TYPE_MAP,
                usize::from(record.latitude.is_some()) + usize::from(record.longitude.is_some()),
            );
            for (key, value) in [
                ("latitude", record.latitude),
                ("longitude", record.longitude),
            ] {
                if let Some(value) = value {
                    write_string(out, key);
                    write_control(out, TYPE_DOUBLE, 8);
                    out.extend_from_slice(&value.to_be_bytes());
                }
            }
        }
        offset
    }
}

/// `"names": {"en": name}`.
fn write_names(out: &mut Vec<u8>, name: &str) {
    write_string(out, "names");
    write_control(out, TYPE_MAP, 1);
    write_string(out, "en");
    write_string(out, name);
}

const TYPE_STRING: u8 = 2;
const TYPE_DOUBLE: u8 = 3;
const TYPE_UINT16: u8 = 5;
const TYPE_UINT32: u8 = 6;
const TYPE_MAP: u8 = 7;
const TYPE_UINT64: u8 = 9;
const TYPE_ARRAY: u8 = 11;

/// Control byte, extended type byte and size bytes, per the MaxMind DB spec's data section.
fn write_control(out: &mut Vec<u8>, kind: u8, size: usize) {
    let (size_bits, extra): (u8, Vec<u8>) = if size < 29 {
        (size as u8, Vec::new())
    } else if size < 29 + 256 {
        (29, vec![(size - 29) as u8])
    } else if size < 285 + 65_536 {
        (30, ((size - 285) as u16).to_be_bytes().to_vec())
    } else {
        (31, ((size - 65_821) as u32).to_be_bytes()[1..].to_vec())
    };
    if kind <= 7 {
        out.push((kind << 5) | size_bits);
    } else {
        out.push(size_bits);
        out.push(kind - 7);
    }
    out.extend_from_slice(&extra);
}

fn write_string(out: &mut Vec<u8>, text: &str) {
    write_control(out, TYPE_STRING, text.len());
    out.extend_from_slice(text.as_bytes());
}

fn write_uint(out: &mut Vec<u8>, kind: u8, width: usize, value: u64) {
    write_control(out, kind, width);
    out.extend_from_slice(&value.to_be_bytes()[8 - width..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maxminddb_reads_what_we_write() {
        let mut writer = MmdbWriter::new();
        writer.insert("10.0.0.0".parse().unwrap(), 8, Some("de"), Some("eu"));
        writer.insert("10.1.2.0".parse().unwrap(), 24, Some("fr"), Some("EU"));
        writer.insert("2001:db8::".parse().unwrap(), 32, None, Some("as"));
        let reader = maxminddb::Reader::from_source(writer.to_bytes()).unwrap();
        reader.verify().unwrap();
        let country = |ip: &str| {
            reader
                .lookup(ip.parse().unwrap())
                .unwrap()
                .decode::<maxminddb::geoip2::Country>()
                .unwrap()
                .map(|record| {
                    (
                        record.country.iso_code.map(str::to_owned),
                        record.continent.code.map(str::to_owned),
                    )
                })
        };
        assert_eq!(
            country("10.9.9.9"),
            Some((Some("DE".into()), Some("EU".into())))
        );
        assert_eq!(
            country("10.1.2.3"),
            Some((Some("FR".into()), Some("EU".into())))
        );
        assert_eq!(country("2001:db8:1::1"), Some((None, Some("AS".into()))));
        assert_eq!(country("11.0.0.1"), None);
    }

    #[test]
    fn maxminddb_reads_city_records() {
        let mut writer = MmdbWriter::new();
        writer.insert_city(
            "10.0.0.0".parse().unwrap(),
            8,
            &CityRecord {
                country: Some("de"),
                country_name: Some("Germany"),
                continent: Some("eu"),
                city: Some("Berlin"),
                region_code: Some("BE"),
                region_name: Some("Land Berlin"),
                postal_code: Some("10115"),
                latitude: Some(52.5244),
                longitude: Some(13.4105),
            },
        );
        writer.insert_city(
            "11.0.0.0".parse().unwrap(),
            8,
            &CityRecord {
                country: Some("US"),
                ..CityRecord::default()
            },
        );
        let reader = maxminddb::Reader::from_source(writer.to_bytes()).unwrap();
        reader.verify().unwrap();
        assert_eq!(reader.metadata().database_type, "GeoLite2-City");
        let city: maxminddb::geoip2::City = reader
            .lookup("10.1.2.3".parse().unwrap())
            .unwrap()
            .decode()
            .unwrap()
            .unwrap();
        assert_eq!(city.country.iso_code, Some("DE"));
        assert_eq!(city.country.names.english, Some("Germany"));
        assert_eq!(city.continent.code, Some("EU"));
        assert_eq!(city.city.names.english, Some("Berlin"));
        assert_eq!(city.subdivisions[0].iso_code, Some("BE"));
        assert_eq!(city.subdivisions[0].names.english, Some("Land Berlin"));
        assert_eq!(city.postal.code, Some("10115"));
        assert_eq!(city.location.latitude, Some(52.5244));
        assert_eq!(city.location.longitude, Some(13.4105));
        let bare: maxminddb::geoip2::City = reader
            .lookup("11.2.3.4".parse().unwrap())
            .unwrap()
            .decode()
            .unwrap()
            .unwrap();
        assert_eq!(bare.country.iso_code, Some("US"));
        assert_eq!(bare.city.names.english, None);
    }
}

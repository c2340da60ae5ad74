//! A minimal writer of MaxMind DB files (format 2.0) holding country and continent codes,
//! and optionally City-style names, region and coordinates.
//!
//! Tests and the DNS benchmark use it to make small GeoIP databases at run time, so nothing
//! that expires or carries a licence is checked in. It writes an IPv6 tree with 24-bit
//! records; IPv4 networks live under `::/96`, where readers look for them. It is not meant
//! for production databases: networks should be inserted from the widest to the narrowest.

use std::net::IpAddr;

/// One City-style record for [`MmdbWriter::insert_city`]; every field may be left out.
#[derive(Debug, Clone, Copy, Default)]
pub struct CityRecord<'a> {
    /// ISO code, any case (written upper case).
    pub country: Option<&'a str>,
    /// The country's English name.
    pub country_name: Option<&'a str>,
    /// Continent code, any case (written upper case).
    pub continent: Option<&'a str>,
    /// The city's English name.
    pub city: Option<&'a str>,
    /// The first subdivision's English name.
    pub region: Option<&'a str>,
    /// The first subdivision's ISO code.
    pub region_code: Option<&'a str>,
    pub latitude: Option<f64>,
    pub longitude: Option<f64>,
}

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
        self.insert_at(network, prefix_len, offset);
    }

    /// Maps `network/prefix_len` to a record like GeoLite2-City's: the codes of
    /// [`MmdbWriter::insert`] plus `names.en` of country and city, the first subdivision and
    /// `location`. Marks the database as a City database.
    pub fn insert_city(&mut self, network: IpAddr, prefix_len: u8, record: &CityRecord<'_>) {
        "GeoLite2-City".clone_into(&mut self.database_type);
        let offset = self.write_city(record);
        self.insert_at(network, prefix_len, offset);
    }

    fn insert_at(&mut self, network: IpAddr, prefix_len: u8, offset: u32) {
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

    fn write_city(&mut self, record: &CityRecord<'_>) -> u32 {
        let offset = self.data.len() as u32;
        let out = &mut self.data;
        let has_country = record.country.is_some() || record.country_name.is_some();
        let has_region = record.region.is_some() || record.region_code.is_some();
        let has_location = record.latitude.is_some() || record.longitude.is_some();
        let entries = [
            record.continent.is_some(),
            has_country,
            record.city.is_some(),
            has_region,
            has_location,
        ];
        write_control(
            out,
            TYPE_MAP,
            entries.iter().filter(|entry| **entry).count(),
        );
        if let Some(code) = record.continent {
            write_string(out, "continent");
            write_control(out, TYPE_MAP, 1);
            write_string(out, "code");
            write_string(out, &code.to_ascii_uppercase());
        }
        let named = |out: &mut Vec<u8>, code: Option<&str>, name: Option<&str>| {
            write_control(
                out,
                TYPE_MAP,
                usize::from(code.is_some()) + usize::from(name.is_some()),
            );
            if let Some(code) = code {
                write_string(out, "iso_code");
                write_string(out, code);
            }
            if let Some(name) = name {
                write_string(out, "names");
                write_control(out, TYPE_MAP, 1);
                write_string(out, "en");
                write_string(out, name);
            }
        };
        if has_country {
            write_string(out, "country");
            let code = record.country.map(str::to_ascii_uppercase);
            named(out, code.as_deref(), record.country_name);
        }
        if let Some(city) = record.city {
            write_string(out, "city");
            named(out, None, Some(city));
        }
        if has_region {
            write_string(out, "subdivisions");
            write_control(out, TYPE_ARRAY, 1);
            named(out, record.region_code, record.region);
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
}

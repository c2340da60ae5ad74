//! Writes a small MaxMind-format GeoIP database, for benchmarks and manual tests.
//!
//! `cargo run -p defenra-geo --example write-test-mmdb -- OUT.mmdb 81.0.0.0/8=DE:EU ...`
//! Each entry is `network/prefix=COUNTRY:CONTINENT`; either code may be empty.

use defenra_geo::mmdb_writer::MmdbWriter;

fn main() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let out = args
        .next()
        .ok_or("usage: write-test-mmdb OUT.mmdb network/prefix=CC:CONT ...")?;
    let mut writer = MmdbWriter::new();
    for entry in args {
        let (network, codes) = entry
            .split_once('=')
            .ok_or(format!("{entry:?} is not network/prefix=CC:CONT"))?;
        let (address, prefix) = network
            .split_once('/')
            .ok_or(format!("{network:?} has no /prefix"))?;
        let (country, continent) = codes.split_once(':').unwrap_or((codes, ""));
        writer.insert(
            address
                .parse()
                .map_err(|error| format!("{address:?}: {error}"))?,
            prefix
                .parse()
                .map_err(|error| format!("{prefix:?}: {error}"))?,
            Some(country).filter(|code| !code.is_empty()),
            Some(continent).filter(|code| !code.is_empty()),
        );
    }
    std::fs::write(&out, writer.to_bytes()).map_err(|error| format!("{out}: {error}"))
}

//! The bodies of the fuzz targets in `fuzz_targets/`, one public function per target.
//!
//! Each function is a thin layer over a crate's real entry point (the same code the agent
//! runs on bytes from the network or from Core) plus the checks every input must pass.
//! Not panicking is the first check; each module states the others, which catch wrong
//! answers that do not crash: a DNS response that does not parse, an origin request head
//! framed differently from the client's, a chunked body scanned differently when it
//! arrives in pieces, a WAF script that changes what the next request sees.
//!
//! `cargo xtask fuzz` builds and runs the targets; `fuzz/corpus/TARGET` holds the
//! committed seeds, `fuzz/dicts/TARGET.dict` the libFuzzer dictionaries. To see what the
//! crates log while one input runs (a WAF script's error, say), set `RUST_LOG` (for example
//! `RUST_LOG=defenra_waf=debug`) when running a target's binary on that input.

pub mod config;
pub mod dns;
pub mod http;
pub mod l4;
pub mod shield;
pub mod waf;

/// Logs to stderr when `RUST_LOG` is set; called once by the targets that log.
pub fn init_logging() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        if std::env::var_os("RUST_LOG").is_some() {
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_writer(std::io::stderr)
                .init();
        }
    });
}

/// Reads a fuzzer's bytes as a sequence of small decisions; past the end every read is 0.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    bytes: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Input { bytes }
    }

    pub fn u8(&mut self) -> u8 {
        match self.bytes.split_first() {
            Some((&first, rest)) => {
                self.bytes = rest;
                first
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }

    pub fn u64(&mut self) -> u64 {
        let mut value = 0;
        for _ in 0..8 {
            value = value << 8 | u64::from(self.u8());
        }
        value
    }

    /// Up to `n` bytes.
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (taken, rest) = self.bytes.split_at(n.min(self.bytes.len()));
        self.bytes = rest;
        taken
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// A small deterministic generator (xorshift64*) for choices derived from an input.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `1..=max`.
    pub fn size(&mut self, max: usize) -> usize {
        1 + (self.next_u64() % max.max(1) as u64) as usize
    }
}

//! Integration tests: a real `DnsService` on `127.0.0.1:0`, queried over UDP and TCP with
//! messages built and parsed by hickory-proto.

mod authority;
mod fuzz;
mod geo;
mod protocol;
mod records;
mod rrl;
mod support;
mod tcp;

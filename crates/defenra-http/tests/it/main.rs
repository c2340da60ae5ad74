//! Integration tests: a real proxy on loopback listeners in front of a real test origin.

mod access;
mod bodies;
mod headers;
mod limits;
mod pool;
mod protocols;
mod routing;
mod shield;
mod support;
mod tls;
mod traffic;
mod wire;

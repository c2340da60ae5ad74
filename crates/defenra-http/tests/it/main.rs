//! Integration tests: a real proxy on loopback listeners in front of a real test origin.

mod access;
mod bodies;
mod challenge;
mod fairness;
mod headers;
mod limits;
mod pages;
mod pool;
mod protocols;
mod routing;
mod shield;
mod support;
mod tls;
mod traffic;
mod wire;

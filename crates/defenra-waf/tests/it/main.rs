//! Integration tests: the classic example rules run through the real HTTP proxy.

mod rules;

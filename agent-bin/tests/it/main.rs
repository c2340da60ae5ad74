//! Black-box tests of the `defenra-agent` binary: flags, check-config, health/stats/metrics,
//! SIGHUP and SIGTERM, the end-to-end scenario (`e2e`) and the browser challenge in headless
//! Chromium (`challenge`). Every listener is on 127.0.0.1:0; ports come from the JSON logs.

mod challenge;
mod check_config;
mod connect;
mod e2e;
mod e2e_support;
mod fleet;
mod geoip;
mod lifecycle;
mod proxied_names;
mod reports;
mod shield;
mod support;
mod waf_geo;

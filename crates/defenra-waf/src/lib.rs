//! defenra-waf

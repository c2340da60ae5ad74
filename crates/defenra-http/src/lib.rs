//! defenra-http

//! defenra-geo

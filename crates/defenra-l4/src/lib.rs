//! defenra-l4

//! defenra-dns

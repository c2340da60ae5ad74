//! Integration tests of the config pipeline: Core polling against a fake Core, file
//! reloads, the state dir, and the config loop's timing.

mod core;
mod enrol;
mod file;
mod support;
mod timing;

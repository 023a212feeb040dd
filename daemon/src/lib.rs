//! arw-daemon: configuration, state directory, capability probe and the wiring behind the
//! `arw-server` and `arw-cli` binaries.

pub mod cli;
pub mod config;
pub mod connector;
pub mod egress;
pub mod executor;
pub mod http;
pub mod journal;
pub mod probe;
pub mod process;
pub mod proxy;
pub mod relay;
pub mod server;
pub mod state_dir;
pub mod tasks;
pub mod trust;

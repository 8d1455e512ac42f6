//! The Shoal node: listeners, connection and shard actors, routing, storage and the admin
//! endpoint, assembled by [`run`]-style library functions so tests can boot real nodes
//! in-process. `main.rs` only parses the command line.

pub mod admin;
pub mod config;
pub mod metrics;
pub mod ratelimit;
pub mod storage;
pub mod tls;

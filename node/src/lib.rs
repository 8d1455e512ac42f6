//! The Shoal node: listeners, connection and shard actors, routing, storage and the admin
//! endpoint, assembled by `server::run`-style library functions so tests can boot real nodes
//! in-process. `main.rs` only parses the command line.

pub mod admin;
pub mod c2s;
pub mod cluster;
pub mod config;
pub mod jobs;
pub mod metrics;
pub mod model;
pub mod muc;
pub mod proxy;
pub mod ratelimit;
pub mod roster;
pub mod router;
pub mod s2s;
pub mod server;
pub mod server_iq;
pub mod shard;
pub mod storage;
pub mod testing;
pub mod tls;
pub mod user;

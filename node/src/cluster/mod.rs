//! Cluster mode: several nodes acting as one server (DESIGN.md "Cluster coordination").
//!
//! Redis holds membership, shard leases and the session directory; nodes forward
//! stanzas to each other over one ordered gRPC stream per peer pair. Nothing here is on
//! a single node's path.

pub mod coordinator;
pub mod directory;
pub mod forward;
pub mod link;
pub mod membership;
pub mod runtime;
pub mod shards;

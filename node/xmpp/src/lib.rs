//! Shoal's XMPP protocol core, sans-IO.
//!
//! This crate owns everything about the wire protocol that can be decided from bytes and
//! a clock reading alone: JIDs, the stream framer, stream headers and errors, typed
//! stanzas and stanza errors, SASL mechanisms and the negotiation state machines. It must
//! never do I/O, read a clock, spawn tasks or depend on a runtime, actor system, Redis or
//! gRPC crate (DESIGN.md invariant 1): drivers in `shoal-node` and `shoal-loadtest` feed
//! it bytes and `now`, and carry out the actions it returns.
pub mod c2s;
pub mod error;
pub mod framer;
pub mod ns;
pub mod s2s;
pub mod sasl;
pub mod stanza;
pub mod stream;
pub mod xml;

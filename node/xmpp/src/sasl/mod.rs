//! SASL (RFC 6120 §6) server mechanisms: SCRAM-SHA-1, SCRAM-SHA-256 and PLAIN.
//!
//! Owns the credential format (salted SCRAM keys, never a password) and the per-exchange
//! mechanism state. It never looks anything up itself: when a mechanism needs a user's
//! stored credentials it says so, and the driver answers after its storage lookup.

mod credentials;

pub use credentials::{ScramCredentials, ScramHash, StoredCredentials};

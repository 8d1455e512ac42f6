//! SASL (RFC 6120 §6) server mechanisms: SCRAM-SHA-1, SCRAM-SHA-256 and PLAIN, plus the
//! SCRAM and PLAIN client side used by the load tester and tests.
//!
//! Owns the credential format (salted SCRAM keys, never a password) and the per-exchange
//! mechanism state. It never looks anything up itself: when a mechanism needs a user's
//! stored credentials it says so, and the driver answers after its storage lookup. All
//! messages are raw bytes: base64 of the XMPP element text is the caller's job, as are
//! nonces and salts, because this crate reads no randomness.

mod client;
mod credentials;
mod plain;
mod scram;
mod server;

pub use client::{ScramClient, ScramClientError, plain_initial_response};
pub use credentials::{ScramCredentials, ScramHash, StoredCredentials};
pub(crate) use server::saslprep_name;
pub use server::{Mechanism, SaslFailure, SaslServer, SaslStep};

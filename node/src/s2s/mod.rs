//! Server-to-server federation (RFC 6120, XEP-0220, XEP-0178, XEP-0368).

pub mod resolve;
